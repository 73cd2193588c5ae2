import cProfile, pstats, sys, time, os, json
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
def main():
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from serving.fast_lora import plugin
    plugin.select(True)
    student = "/root/.cache/mode-cotd/students/smollm2-135m-instruct"
    experts = ["gsm8k","aqua","addsub","svamp","multiarith","single_eq","commonsense_qa","date_understanding"]
    llm = LLM(model=student, dtype="float32", enable_lora=True, max_lora_rank=8, max_loras=10, max_model_len=1024,
              enforce_eager=True, gpu_memory_utilization=0.3, seed=0)
    prompts = [json.loads(l)["prompt"] for l in open("/work/main/benchmarks/results/full-20261127/prompts.jsonl")][:16]
    sp = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0)
    reqs = {e: LoRARequest(e, i + 1, f"/work/main/bundles/default/experts/{e}") for i, e in enumerate(experts)}
    llm.generate(prompts[:2], sp, lora_request=[reqs[e] for e in experts[:2]])  # warm
    for e in experts: llm.generate(prompts[:1], SamplingParams(max_tokens=2), lora_request=reqs[e])
    for name, loras in [("one", [reqs["gsm8k"]] * 16), ("eight", [reqs[experts[i % 8]] for i in range(16)])]:
        pr = cProfile.Profile(); t = time.perf_counter(); pr.enable()
        llm.generate(prompts, sp, lora_request=loras)
        pr.disable(); dt = time.perf_counter() - t
        print(f"== {name}: {16*64/dt:.1f} tok/s, {dt:.1f} s", flush=True)
        pstats.Stats(pr).sort_stats("cumulative").print_stats(r"fast_lora|lora/|punica|execute_model|_prepare|sample|forward", 25)
if __name__ == "__main__":
    main()
