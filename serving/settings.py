"""Serving configuration: plain dataclasses, one docstring per field.

`ServeSettings` is the whole app: the bundle and student, HTTP address, and one section
per concern (deployments, engine, router batching, adapter cache, API limits). The same
tree is filled from `mode-cotd serve` flags (serving.cli), from a Serve config YAML's
`args:` (serving.app.build_app), or in code (tests). `from_dict` refuses unknown keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mode_cotd.errors import ConfigError
from mode_cotd.settings import settings_from_dict


@dataclass
class AutoscalingSettings:
    """Ray Serve autoscaling of one deployment (replaces a fixed replica count)."""

    min_replicas: int = 1
    """Fewest replicas kept running."""
    max_replicas: int = 4
    """Most replicas started under load."""
    target_ongoing_requests: float = 16.0
    """Requests in flight per replica that autoscaling aims for."""


@dataclass
class DeploymentSettings:
    """Replicas and resources of one Ray Serve deployment."""

    num_replicas: int = 1
    """Fixed number of replicas (ignored when `autoscaling` is set)."""
    autoscaling: AutoscalingSettings | None = None
    """Autoscale between min and max replicas instead of a fixed count."""
    num_cpus: float = 0.0
    """CPUs Ray reserves per replica."""
    num_gpus: float = 0.0
    """GPUs Ray reserves per replica (the student wants 1 on a GPU machine)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per replica (e.g. {"student_node": 1}): only nodes that offer them host it."""
    max_surge_percent: int = 0
    """Extra replicas (% of the target) started before old ones stop when new code or args roll out (0: stop first)."""
    max_ongoing_requests: int = 256
    """Requests one replica handles at once; more wait in Serve's queue."""
    max_queued_requests: int = 256
    """Requests waiting for a replica before callers get 503 (-1: no limit)."""
    retry_after_s: float = 1.0
    """`Retry-After` (seconds, rounded up) on Serve's 503 when the queue is full."""
    health_check_period_s: float = 2.0
    """Seconds between Serve's health checks of a replica: a replica that died (kill -9) is noticed and
    replaced within about this (Serve's own default is 10 s)."""
    health_check_timeout_s: float = 30.0
    """A health check unanswered this long marks the replica unhealthy (Serve's default)."""

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                  **({"resources": dict(self.resources)} if self.resources else {})},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "max_surge_percent": self.max_surge_percent,
            "backpressure_config": {"status_code": 503, "retry_after_s": self.retry_after_s},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.autoscaling is None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = dataclasses.asdict(self.autoscaling)
        return options


@dataclass
class EngineSettings:
    """The vLLM engine of the student deployment."""

    max_model_len: int = 2048
    """Context length (prompt + output tokens); capped by the student's own maximum."""
    dtype: str = "auto"
    """Weights and activations dtype: "bfloat16", "float16", "float32", or "auto": the student's config,
    except float32 on a CPU without bf16 arithmetic, where bfloat16 ran ~3x slower (`mode_cotd.compute_dtype`)."""
    max_loras: int = 64
    """LoRA slots for distinct adapters in one running batch: mixtures and composites (each takes one), and
    experts when there is no mixture union. The union's experts get slots of their own on top (pinned).
    Each slot costs ~(Σ over LoRA layers of in + out) · max_lora_rank weights: ~12 MB in bf16 for the
    default student at rank 16."""
    max_cpu_loras: int = 16
    """Adapters vLLM keeps loaded in host memory (LRU beyond that); >= max_loras."""
    max_lora_rank: int | None = None
    """Largest adapter rank vLLM serves; None sizes it for k·r from the bundle. Rounded up to a rank vLLM supports."""
    max_num_seqs: int = 64
    """Sequences in one continuous batch."""
    max_queued_requests: int | None = 128
    """Requests a student replica holds beyond the running batch (max_num_seqs) - building adapters or
    waiting in vLLM - before it answers 503 (None: no limit)."""
    gpu_memory_utilization: float = 0.3
    """Fraction of accelerator memory (host memory on vLLM's CPU backend) vLLM may take."""
    kv_cache_memory_bytes: int | None = None
    """Explicit KV cache size in bytes (overrides gpu_memory_utilization for the cache)."""
    enforce_eager: bool = False
    """Skip graph capture/compilation: faster start, slower steps."""
    cpu_threads_bind: str = "auto"
    """vLLM CPU backend only: cores for the model worker's threads. "auto": vLLM's choice (the same cores in
    every replica on a node); "per-replica": one core per student replica on a node (its local rank modulo
    the cores this process may use), so two replicas never share one; "nobind"; or a core list like "0-3".
    Anything but "auto" overrides $VLLM_CPU_OMP_THREADS_BIND; "auto" leaves it as the environment set it."""
    fast_lora: bool = True
    """mode-cotd's grouped LoRA ops on vLLM's CPU backend (serving/fast_lora); off: vLLM's own LoRA ops."""
    compile: bool = False
    """Compile the student with LoRA as vLLM compiles it without (Dynamo traced once, Inductor), the grouped ops
    running as custom ops (serving/fast_lora/compiled_ops.py): faster steps, a start ~150 s longer here (200 s, not 50).
    vLLM's CPU backend with fast_lora only (vLLM itself never compiles a CPU LoRA engine); off with enforce_eager."""
    resident_experts: int | None = None
    """Experts of the mixture union kept in LoRA slots at once. None: every expert loaded and pinned at start (one
    slot and one host copy each; a union of 1,000 rank-8 experts took 16.5 GiB in bfloat16 here and minutes to
    start, benchmarks/results/paging-20261207/). K: K slots for the
    union, filled on demand: a request's experts are loaded and pinned while it runs, the least recently used
    idle one unloaded when a slot is needed, requests waiting while all K are in use (serving/expert_paging.py).
    At least the experts one request can weigh: 2 (3 with a shared adapter) for a union of over 16 experts."""
    mixture_union: bool = True
    """Serve mixtures without composites: the bundle's experts pinned in vLLM, each mixture an id that encodes
    its weights, applied by the grouped ops (serving/mixture_union.py). Needs fast_lora, experts on linear
    modules only, and weights on the grid summing to 1 (plus the shared adapter at 1, where the bundle has one);
    other mixtures still get composites."""
    stream_interval: int = 4
    """Output tokens per streamed chunk after the first (vLLM's stream_interval; the first token always goes out at
    once). Every chunk crosses two Serve processes (student replica -> ingress -> proxy) before the client: on a
    2-core CPU, chunks of 1 token cost ~20% of the student route's throughput against chunks of 4
    (docs/performance.md). 1: every token as soon as it is made. Non-streamed requests are unaffected."""
    prefix_caching: bool = True
    """vLLM's automatic prefix caching: a request whose prompt begins like an earlier one's, on the same adapter or
    mixture, reuses that prefix's KV cache instead of computing it again."""
    seed: int = 0
    """Engine seed (per-request `seed` still applies)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More vllm.AsyncEngineArgs keyword arguments, passed as given."""


@dataclass
class RouterSettings:
    """The gate deployment's batching (Ray Serve @serve.batch)."""

    max_batch_size: int = 32
    """Most prompts the gate scores in one call."""
    batch_wait_timeout_s: float = 0.01
    """Longest wait for a batch to fill before it runs."""


@dataclass
class CacheSettings:
    """Composite adapters on local disk."""

    dir: str | None = None
    """Folder for composites (None: <mode-cotd cache>/composites); one sub-folder per bundle."""
    max_entries: int = 64
    """Composites kept on disk; the least recently used idle one is evicted beyond that."""
    mixture_grid: float = 0.05
    """Grid explicit mixtures are rounded to when the bundle has no gate (else the gate's grid)."""


@dataclass
class ApiSettings:
    """The OpenAI HTTP surface."""

    served_model_name: str = "mode-cotd"
    """Model name of the gate route; `<name>:<expert or composition>` names the others."""
    default_max_tokens: int = 256
    """max_tokens when a request gives none (capped by the room left in the context)."""
    max_inflight_requests: int = 512
    """Requests in flight at one ingress replica before new ones get 429."""
    max_n: int = 8
    """Largest `n` (choices per request) accepted."""
    max_prompts: int = 64
    """Most prompts in one completions request whose `prompt` is a list (lm-eval sends --batch_size of them);
    more get 400 too_many_prompts. Each is routed and generated as its own request would be."""
    max_logprobs: int = 20
    """Largest `logprobs` / `top_logprobs` accepted."""
    adapter_end_marker: str | None = " END"
    """End of the experts' output format (`<rationale> --> <answer> END`): a choice served with an adapter
    stops after it, and keeps it in its text, as in evaluation. None: adapters stop only at eos or `stop`."""
    max_body_bytes: int = 1_048_576
    """Largest request body accepted; bigger ones get 413."""
    max_prompt_tokens: int | None = None
    """Most prompt tokens accepted (None: whatever fits the context with at least one output token)."""
    max_output_tokens: int | None = None
    """Largest `max_tokens` / `max_completion_tokens` accepted (None: whatever fits the context)."""
    max_stop_strings: int = 4
    """Most `stop` strings per request."""
    retry_after_s: int = 1
    """`Retry-After` (seconds) sent with every 429 and 503."""
    gate_timeout_s: float = 5.0
    """Longest wait for the gate's decision before the request takes `gate_fallback`."""
    gate_fallback: str | None = "student"
    """Route when the gate fails or times out: "student" (no adapter), an expert's name, or None (answer 503)."""
    student_wait_timeout_s: float = 10.0
    """Longest wait (under Ray Serve) for a student replica to take a request: while none is up (one is
    restarting) or all are full, Serve holds requests in its queue; past this the request gets 503 +
    Retry-After instead of waiting out the restart."""
    api_keys_file: str | None = None
    """File with the accepted API keys, one per line (`Authorization: Bearer <key>`); None: see api_keys_env."""
    api_keys_env: str = "MODE_COTD_API_KEYS"
    """Environment variable with accepted API keys (comma-separated). No keys from either source: no auth."""
    log_prompts: bool = False
    """Put prompt text in the request log (off: ids, route, status, token counts and times only)."""


@dataclass
class RuntimeSettings:
    """Routes added while the server runs (serving/runtime_api.py): experts through vLLM's
    /v1/load_lora_adapter and /v1/unload_lora_adapter, and few-shot compositions through /v1/compositions."""

    enabled: bool = False
    """Accept the runtime endpoints (off: they answer 404, and the server state never changes)."""
    state_dir: str | None = None
    """Folder of the runtime routes, kept across restarts and read by every replica (None: `<bundle>.runtime`
    beside a local bundle; <mode-cotd cache>/runtime/<bundle fingerprint> for a bundle URI). Never inside the
    bundle. On a multi-node cluster it must be a folder every node sees (a shared file system)."""
    adapter_roots: list[str] = field(default_factory=list)
    """Where `lora_path` may point: local folders, or URI prefixes (s3://bucket/loras/) read through fsspec as
    bundle URIs are. Empty: every path is refused."""
    max_routes: int = 32
    """Most runtime routes (experts and compositions together); one more gets 400."""
    max_examples: int = 16
    """Most examples per composition job."""
    max_example_chars: int = 8000
    """Longest prompt + answer of one example, in characters."""
    max_jobs: int = 1
    """Composition jobs running at once on one ingress replica; one more gets 429."""
    search_budget: int = 40
    """Candidate mixtures a composition job scores (the paper's 40 nevergrad steps)."""
    objective: str = "answer_loss"
    """What a job minimises: "answer_loss" (mean loss of the answer tokens, the objective study's winner,
    docs/results.md) or "few_shot_loss" (the paper's: every target token)."""
    l1: float = 0.05
    """L1 penalty on the weights (the paper's 0.05 · mean |w|)."""
    optimizer: str = "NGOpt"
    """nevergrad optimizer of the search."""
    seed: int = 0
    """Seed of the search."""
    job_priority: str = "background"
    """How a job's scoring shares the engine: "background" (one example at a time, each starting only when the
    engine holds no other request: others' latency is kept, the job runs in idle time) or "shared" (all examples
    at once, beside everyone's requests: the fastest job, others slowed while it runs)."""


@dataclass
class ServeSettings:
    """Everything `mode-cotd serve` and `serve run serving.app:build_app` configure."""

    bundle: str = "bundles/residual"
    """Bundle folder (manifest.json, experts/, gate/), or a URI (s3://, gs://, file://) fetched to the cache."""
    student: str | None = None
    """Student name or HF folder (None: the default student, SmolLM2-135M-Instruct)."""
    host: str = "127.0.0.1"
    """HTTP host the server binds."""
    port: int = 8000
    """HTTP port the server binds."""
    http_path: str = "auto"
    """How `mode-cotd serve` takes HTTP (serving/http_path.py): "direct" (the ingress replica itself listens on
    host:port; one process fewer on every streamed chunk), "proxy" (Serve's HTTP proxy on host:port forwards to the
    ingress replicas), or "auto": direct with one ingress replica on a Ray it starts itself, else proxy."""
    layout: str = "split"
    """How the app's parts map to Ray Serve deployments. "split": an ingress (FastAPI), a router (the gate) and a
    student (vLLM) deployment, each with its own replicas and resources; every streamed chunk crosses from the
    student replica to the ingress. "colocated": one deployment whose replicas hold all three (the student's
    resources and replica count, the ingress's request limits): no Ray call on the hot path."""
    app_name: str = "mode-cotd"
    """Ray Serve application name."""
    route_prefix: str = "/"
    """HTTP path prefix of the app."""
    ingress: DeploymentSettings = field(default_factory=lambda: DeploymentSettings(max_ongoing_requests=1024))
    """The FastAPI ingress deployment (its own in-flight limit, api.max_inflight_requests, answers 429)."""
    router: DeploymentSettings = field(default_factory=DeploymentSettings)
    """The gate deployment."""
    student_deployment: DeploymentSettings = field(default_factory=lambda: DeploymentSettings(num_cpus=1.0))
    """The vLLM student deployment."""
    engine: EngineSettings = field(default_factory=EngineSettings)
    """vLLM engine sizes."""
    batching: RouterSettings = field(default_factory=RouterSettings)
    """Gate batching."""
    cache: CacheSettings = field(default_factory=CacheSettings)
    """Composite adapter cache."""
    api: ApiSettings = field(default_factory=ApiSettings)
    """OpenAI API limits and names."""
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    """Experts and compositions added while serving (off by default)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def front(self) -> DeploymentSettings:
        """The deployment whose replicas take HTTP: the ingress, or in the colocated layout the one deployment,
        sized as the student (its replicas and resources) with the ingress's limits on requests."""
        if self.layout == "split":
            return self.ingress
        if self.layout != "colocated":
            raise ConfigError(f"layout: expected 'split' or 'colocated', got {self.layout!r}")
        return dataclasses.replace(self.student_deployment, max_ongoing_requests=self.ingress.max_ongoing_requests,
                                   max_queued_requests=self.ingress.max_queued_requests)


def from_dict(cls: type, data: Any, where: str = "settings"):
    """Build dataclass `cls` from a nested dict; ConfigError names unknown keys and bad values. Strings are
    parsed for numbers and booleans (`serve run ... key=value`, mode_cotd.settings.settings_from_dict)."""
    return settings_from_dict(cls, data, where, coerce=True)
