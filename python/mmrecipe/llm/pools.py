"""Instruction pools written by an LLM from hand-written seeds (`[pool.NAME] generate`).

Call k (k = 0, 1, ...) shows the seeds as the model's own earlier replies (few-shot
turns, listed from the k-th seed on), asks for `per_call` more, and uses seed + k; each
call goes through the call cache like any LLM stage, so a release rebuilds offline. Each
reply line becomes a candidate: list markers, numbering and quotes stripped; it is kept
when it is a valid template whose placeholders are the seeds' (none unknown, none that
every seed has missing) and it is no duplicate of the pool so far, by normalized text
(case, punctuation and spacing ignored) or by the same words in another order, nor a
near duplicate (ROUGE-L over words above `max_similarity` against any instruction kept). Calls go
on until `count` candidates are kept or `max_calls` were made; the pool is the fixed
templates, the seeds, then the first `count` candidates kept. What was kept from calls
0..k depends only on their replies, so a build that makes the calls and one served by
the cache give the same pool. Calls are made one after the other, since whether call k
is needed depends on the replies before it; a pool is generated once and then cached."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import polars as pl

from ..errors import LLMError
from ..recipe.plan import Plan, PoolPlan
from ..recipe.validate import placeholders, template_problem
from .stages import LLMStages

DEFAULT_SYSTEM = (
    "You write instructions for a dataset that teaches an assistant to follow them{task}. "
    "Reply with new instructions only, one per line."
)
#: Added to the system prompt when the seeds have placeholders.
KEEP_FIELDS = " Keep every word in curly braces, such as {example}, exactly as it is written."
#: The user turn before each seed (shown as the model's reply) and, by default, of the call.
ASK_ONE = "Write one more instruction, worded differently from the earlier ones."
ASK_MANY = "Write {per_call} more instructions, each worded differently from the earlier ones, one per line."

# A reply line's list marker: "1.", "2)", "(3)", "-", "*", "•".
_MARKER = re.compile(r"^\s*(?:\(?\d{1,3}[.):]\s*|[-*•]\s+)")
_QUOTES = ('"', "'", "“", "”", "`")
#: Longer lines are prose, not an instruction.
MAX_CHARS = 400
MAX_WORDS = 60


@dataclass
class PoolResult:
    """What generating one pool gave: its templates and why candidates were left out."""

    table: str
    templates: list[str]
    fixed: int  # templates and seeds, before the generated ones
    asked: int  # the pool's `count`
    calls: int = 0  # calls whose replies were read
    missing: int = 0  # calls the cache lacked in a run that makes no calls
    dropped: Counter[str] = field(default_factory=Counter)

    @property
    def written(self) -> int:
        return len(self.templates) - self.fixed

    def left_out(self) -> str:
        """" (left out: 2 duplicates, ...)", or "" when nothing was."""
        return " (left out: " + ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) + ")" if self.dropped else ""

    def note(self) -> str:
        text = f"{self.table}: {self.written} of {self.asked} instructions written in {self.calls} calls, pool of {len(self.templates)}"
        if self.missing:
            text += " (the cache holds no more calls)"
        return text + self.left_out()


def expand_pools(plan: Plan, stages: LLMStages) -> tuple[Plan, dict[str, PoolResult]]:
    """The plan with every generated pool (the plan holds those some source uses) filled
    in, and what each gave. In the stages' "cache" mode a pool holds what the cache has
    (maybe only its fixed part)."""
    results = {p.name: generate_pool(p, stages) for p in plan.pools}
    for name, result in results.items():
        stages.pool_notes[name] = result.note()
    return plan.with_pools({name: r.templates for name, r in results.items()}), results


def generate_pool(pool: PoolPlan, stages: LLMStages) -> PoolResult:
    g = pool.spec
    max_calls = g.max_calls if g.max_calls is not None else 3 * -(-g.count // g.per_call) + 2
    required = set.intersection(*(set(placeholders(s)) for s in g.seeds)) if g.seeds else set()
    allowed = {f for t in pool.fixed for f in placeholders(t)}
    result = PoolResult(table=pool.table, templates=list(pool.fixed), fixed=len(pool.fixed), asked=g.count)
    seen = {key for t in pool.fixed for key in _keys(t)}
    kept = [_words(t) for t in pool.fixed]
    ask = g.prompt if g.prompt is not None else (ASK_ONE if g.per_call == 1 else ASK_MANY)
    ask = ask.replace("{per_call}", str(g.per_call)).replace("{task}", pool.task)
    for k in range(max_calls):
        got = stages.ask(pool.table, f"{pool.table}.generate", g, pool.cache, _turns(pool, k, allowed), pl.Series([ask]),
                         pl.Series([k]), pool.table, pool.seed + k)
        if got["missing"][0]:
            result.missing += 1
            break  # "cache" mode: the cache holds no more of this pool
        result.calls += 1
        if got["error"][0] is not None:
            result.dropped["failed calls"] += 1
            continue
        for line in (got["response"][0] or "").splitlines():
            candidate, why = _candidate(line, allowed, required)
            if candidate is None:
                if why:
                    result.dropped[why] += 1
                continue
            keys = _keys(candidate)
            if keys & seen:
                result.dropped["duplicates"] += 1
                continue
            words = _words(candidate)
            if any(rouge_l(words, w) > g.max_similarity for w in kept):
                result.dropped["near duplicates"] += 1
                continue
            seen |= keys
            kept.append(words)
            result.templates.append(candidate)
            if result.written == g.count:
                return result
    if result.written == 0 and result.missing == 0:
        raise LLMError(
            f"{pool.table}.generate: {result.calls} calls gave no usable instruction{result.left_out()}; "
            "check the model and prompt, or raise max_calls"
        )
    return result


def _turns(pool: PoolPlan, k: int, fields: set[str]) -> list[dict[str, str]]:
    """The messages before call k's user turn: the system prompt, then each seed as the
    model's reply to ASK_ONE, listed from the k-th on (so that calls differ)."""
    g, seeds = pool.spec, pool.spec.seeds
    if g.system is not None:
        system = g.system
    else:
        system = DEFAULT_SYSTEM.replace("{task}", f" ({pool.task})" if pool.task else "")
        if fields:
            system += KEEP_FIELDS.replace("{example}", "{" + sorted(fields)[0] + "}")
    turns = [{"role": "system", "content": system}] if system else []
    for seed in seeds[k % len(seeds):] + seeds[: k % len(seeds)]:
        turns += [{"role": "user", "content": ASK_ONE}, {"role": "assistant", "content": seed}]
    return turns


def _candidate(line: str, allowed: set[str], required: set[str]) -> tuple[str | None, str | None]:
    """A reply line as an instruction, or None and why it is left out (None: not one)."""
    text = _MARKER.sub("", line.strip(), count=1).strip()
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    if not text or text.endswith(":") or len(text) < 4:
        return None, None  # a blank, a heading ("Here are 10 instructions:")
    if len(text) > MAX_CHARS or len(text.split()) > MAX_WORDS:
        return None, "too long"
    if template_problem(text) is not None:
        return None, "broken braces"
    if not re.sub(r"\{[^{}]*\}", "", text).strip(" \t.,;:!?"):
        return None, "placeholders only"
    fields = set(placeholders(text))
    if fields - allowed:
        return None, "unknown placeholders"
    if required - fields:
        return None, "missing placeholders"
    return text, None


def _words(template: str) -> list[str]:
    """An instruction's words, case and punctuation left out ({field} counts as one)."""
    return re.findall(r"\{[^{}]*\}|\w+", template.casefold())


def _keys(template: str) -> set[str]:
    """What makes two instructions the same: the normalized text, and its words in order."""
    words = _words(template)
    return {" ".join(words), "\x00" + " ".join(sorted(words))}


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two word lists: 2·LCS / (|a| + |b|), the near-duplicate measure of
    Self-Instruct (which keeps an instruction only below 0.7 against the pool)."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return 2 * prev[-1] / (len(a) + len(b))
