"""``ielts-distill config --check``: combinations of values that validate one by one but fail a real run.

Each finding is one line naming the keys, what a run would do with them, and what to set instead.
"""

from __future__ import annotations

from pipeline import minimax
from pipeline.config import LLMSection, RunConfig, is_reasoning, token_limit
from pipeline.stages import LLM_SPECS

# Tokens per word of a Band-9 essay in SmolLM2's tokenizer (SmolVLM's language model), measured on the
# teacher prompts' examples: the three-step layout (markers, quotes) costs more than plain prose.
TOKENS_PER_WORD = {"structured": 2.1, "unstructured": 1.7}  # max of 10 examples: 1.75-2.07, 1.38-1.66
MARGIN = 1.15  # essays run past max_words; the gate allows some slack too
MIN_THINKING = 1024  # below this a reasoning model often never reaches its answer
DEFAULT_BASE_URL = LLMSection.model_fields["base_url"].default


def tokens_needed(max_words: int, variant: str = "structured") -> int:
    """``generate.max_new_tokens`` that fits a ``max_words`` essay of ``variant``, with margin."""
    return int(max_words * TOKENS_PER_WORD.get(variant, TOKENS_PER_WORD["structured"]) * MARGIN) + 1


def generation_limit(config: RunConfig) -> int:
    """``generate.max_new_tokens``, or when unset what a ``teacher.max_words`` essay of the longest variant
    needs; the same limit for every model, in generate and in ``write``."""
    words = config.teacher.max_words
    return config.generate.max_new_tokens or max(tokens_needed(words, v)
                                                  for v in ("unstructured", *config.finetune.variants))


def _llm_findings(name: str, config: RunConfig) -> list[str]:
    """The findings on the LLM endpoint of config section ``name`` (as resolved: a judge inherits)."""
    own, llm = getattr(config, name), config.endpoint(name)
    # its own base_url, or (embedded left to inherit) a non-default one it inherits with the rest
    explicit_base_url = "base_url" in own.model_fields_set or (own.embedded is None and llm.base_url != DEFAULT_BASE_URL)
    out = []
    if is_reasoning(llm) and llm.reasoning_tokens < MIN_THINKING:
        out.append(f"{name}.reasoning_tokens={llm.reasoning_tokens}: {llm.model} thinks before it answers; with "
                   f"fewer than {MIN_THINKING} tokens of thought most answers are cut (finish_reason 'length')")
    if llm.embedded and explicit_base_url:
        out.append(f"{name}.embedded=true starts a local llama.cpp server and ignores {name}.base_url="
                   f"{llm.base_url}: unset one of them")
    return out


def _minimax_findings(name: str, llm: LLMSection) -> list[str]:
    """MiniMax's documented limits (pipeline.minimax): every request breaking one would be refused."""
    limit = token_limit(llm)
    broken = minimax.violations(llm.model, temperature=llm.temperature, limit=limit, images=llm.vision)
    out = []
    for why in broken:
        if why.startswith("temperature"):
            out.append(f"{name}.temperature={llm.temperature:g}: {llm.model} accepts (0, 1] only (0 is an error); "
                       "every request would be refused (set e.g. 0.01 for near-greedy answers)")
        elif "completion tokens" in why:
            keys = f"{name}.max_tokens={llm.max_tokens}" + (
                f" + {name}.reasoning_tokens={llm.reasoning_tokens}" if limit != llm.max_tokens else "")
            out.append(f"{keys}: {limit} tokens, above {llm.model}'s cap of {minimax.MAX_COMPLETION_TOKENS} a "
                       "completion (thinking included); every request would be refused (lower them)")
        else:
            out.append(f"{name}.vision=true: {llm.model} takes text only and refuses image parts (set "
                       f"{name}.vision=false, or use MiniMax-M3)")
    if getattr(llm, "essay_grammar", False) and minimax.is_minimax(llm.model):
        out.append(f"{name}.essay_grammar=true: a llama.cpp grammar; {llm.model}'s API takes none (set it false)")
    return out


def check_config(config: RunConfig) -> list[str]:
    """Findings for a config that would run but waste money or bias the results (empty: none)."""
    findings = [line for s in LLM_SPECS for line in _llm_findings(s.llm, config)]
    findings += [line for s in LLM_SPECS for line in _minimax_findings(s.llm, config.endpoint(s.llm))]
    gen = config.generate
    if gen.max_new_tokens is not None:
        for variant in config.finetune.variants:
            need = tokens_needed(config.teacher.max_words, variant)
            if gen.max_new_tokens < need:
                findings.append(
                    f"generate.max_new_tokens={gen.max_new_tokens}: a {config.teacher.max_words}-word {variant} essay "
                    f"needs about {need} tokens in SmolLM2's tokenizer; essays would be cut at the limit "
                    f"(set it to {need} or leave it unset)")
    return findings


__all__ = ["TOKENS_PER_WORD", "check_config", "generation_limit", "tokens_needed"]
