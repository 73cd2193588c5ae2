"""Run by test_expert_paging_engine.py in a subprocess: mode-cotd's vLLM engine with 2 of 10 experts resident.

The default bundle's experts (copied, so one can be deleted) form a sparse union (the form of unions over 16
routed experts: mixtures of one or two experts); the engine starts with `resident_experts=2`, so every other
expert is paged in on demand. In order:

1. a mixture of two experts that are not resident at start, greedy: FIRST;
2. other experts and mixtures, one request at a time, which evict both;
3. the first mixture again: AGAIN (must equal FIRST token for token: the same single-row step on the same weights);
4. 8 requests at once over 8 different experts (they page in two at a time, waiting their turn);
5. a request for an expert whose folder was deleted after start: its error, then one more request that works.

Prints a RESULT line of JSON: the texts, the pager's counts, vLLM's registered adapters against the resident set,
the deleted expert's error and the LoRA slots vLLM was started with.
"""

import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path


async def main(student: str, experts_dir: str) -> None:
    from transformers import AutoTokenizer

    from mode_cotd.mixture import Mixture
    from serving.engine import VllmEngine
    from serving.errors import ApiError
    from serving.mixture_union import MixtureUnion
    from serving.protocol import AdapterSpec, SamplingSettings
    from serving.settings import EngineSettings

    work = Path(tempfile.mkdtemp())
    experts = {}
    for path in sorted(Path(experts_dir).iterdir()):
        if (path / "adapter_config.json").is_file():
            experts[path.name] = shutil.copytree(path, work / "experts" / path.name)
    union = MixtureUnion.for_experts(experts, work / "cache", grid_units=20, max_lora_rank=16, sparse=True)
    settings = EngineSettings(max_loras=4, max_num_seqs=16, kv_cache_memory_bytes=256 * 2**20, resident_experts=2,
                              dtype="float32")
    engine = VllmEngine(Path(student), settings, max_lora_rank=16, max_model_len=512)
    await engine.start(pinned=union.members)
    tokenizer = AutoTokenizer.from_pretrained(student)
    sampling = SamplingSettings(max_tokens=24, temperature=0.0)
    prompt = tokenizer("Q: Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes of babysitting. "
                       "How much did she earn?\nA:")["input_ids"]

    def mixture(weights: dict[str, float]):
        return union.target(AdapterSpec(Mixture(tuple(weights), tuple(weights.values()))))

    async def run(target, request_id: str) -> str:
        return "".join([d.text async for d in engine.generate(request_id, prompt, sampling, target)])

    first = await run(mixture({"gsm8k": 0.7, "svamp": 0.3}), "first")
    others = [await run(target, f"other-{i}") for i, target in enumerate(
        [union.member("addsub"), mixture({"aqua": 0.5, "multiarith": 0.5}), union.member("single_eq")])]
    again = await run(mixture({"gsm8k": 0.7, "svamp": 0.3}), "again")
    names = [n for n in union.names if n != "tracking_shuffled_objects"][:8]
    together = await asyncio.gather(*(run(union.member(n), f"together-{n}") for n in names))
    shutil.rmtree(experts["tracking_shuffled_objects"])
    try:
        await run(union.member("tracking_shuffled_objects"), "deleted")
        deleted_error = None
    except ApiError as e:
        deleted_error = f"{type(e).__name__}: {e}"
    after = await run(union.member("gsm8k"), "after")
    registered = sorted(int(i) for i in await engine._llm.list_loras())
    resident = sorted(engine.pager.resident)
    result = {"first": first, "again": again, "others": others, "together": together, "after": after,
              "page_ins": engine.pager.page_ins, "page_outs": engine.pager.page_outs,
              "member_ids": [t.lora_id for t in union.members], "registered": registered, "resident": resident,
              "deleted_error": deleted_error, "max_loras": engine._llm.vllm_config.lora_config.max_loras}
    engine.shutdown()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))
