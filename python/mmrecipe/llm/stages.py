"""The LLM stages of a build: answer lengthening (`[lengthen.NAME]`) and conversation
generation (`[[generate]]`). Prompts, cache keys and cache lookups are column
operations; only the calls that the cache cannot serve go out, `concurrency` at a time,
each recorded durably as it finishes. Modes: "online" calls the endpoint for what is
missing, "offline" fails naming what is missing, "cache" (previews, checks) serves what
the cache has and leaves the rest unlengthened or ungenerated."""

from __future__ import annotations

import sys
import threading
from collections import Counter, defaultdict
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import polars as pl

from .. import _core
from ..buffers import arrow, string_buffers, strings
from ..errors import LLMError
from ..recipe.plan import GeneratePlan, Plan, SourcePlan, pool_of
from ..recipe.schema import GenerateSpec, LLMSpec, PoolGenerateSpec
from ..sources.columns import ROW
from . import replies
from .cache import CallCache, Record
from .client import CallFailed, ChatClient, EndpointUnreachable, Stopped, call_params

Mode = Literal["online", "offline", "cache"]


@dataclass
class TableCounts:
    """What one LLM table did in this run (not part of the release: a rebuild served
    from the cache counts differently)."""

    rows: int = 0  # rows that needed a reply
    cached: int = 0  # served from the cache
    called: int = 0  # calls made
    # rows left without a usable reply: the call failed (now, or before and recorded
    # so) or, when lengthening, the reply was empty or cut at max_tokens
    failed: int = 0
    missing: int = 0  # not in the cache, in a run that makes no calls


class LLMStages:
    """The LLM tables of one build (or check, or preview), with their caches, clients
    and progress bars; `lengthen` and `generate` run on a source's resolved rows."""

    def __init__(self, plan: Plan, mode: Mode = "online", retry_failed: bool = False, progress: bool = True):
        self.plan = plan
        self.mode = mode
        self.retry_failed = retry_failed
        self.progress = progress
        self.counts: dict[str, TableCounts] = {}
        #: Per source: deterministic outcomes (they go into the release's stats).
        self.outcomes: dict[str, Counter[str]] = defaultdict(Counter)
        #: generate table → its first malformed reply's context row and why, for the notes.
        self.first_malformed: dict[str, str] = {}
        self._caches: dict[Path, CallCache] = {}
        self._clients: dict[str, ChatClient] = {}
        self._bars: dict[str, Any] = {}
        self._call_failures: Counter[str] = Counter()
        self._prefixes: dict[str, list[dict[str, str]]] = {}
        #: Generated pool → what generating it gave, for the notes of the sources using it.
        self.pool_notes: dict[str, str] = {}

    def __enter__(self) -> LLMStages:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for cache in self._caches.values():
            cache.close()
        for client in self._clients.values():
            client.close()
        for bar in self._bars.values():
            bar.close()

    def summary(self) -> dict[str, dict[str, int]]:
        return {table: asdict(c) for table, c in self.counts.items()}

    def pool_note(self, source: SourcePlan) -> list[str]:
        """What generating the source's pool gave (every build generates it again, from
        the cache: so the note is never kept in a token store entry)."""
        pool = pool_of(source.spec)
        return [self.pool_notes[pool]] if pool in self.pool_notes else []

    def notes(self, source: str) -> list[str]:
        """What the LLM stages did to a source, for its stats."""
        o = self.outcomes.get(source)
        if not o:
            return []
        out = []
        for table in sorted({k.split(" ", 1)[0] for k in o}):
            get = lambda what: o.get(f"{table} {what}", 0)  # noqa: E731
            if table.startswith("lengthen."):
                text = f"{table}: {get('lengthened')} of {get('rows')} answers lengthened"
                if get("kept"):
                    text += f", {_n(get('kept'), 'kept as it was', 'kept as they were')} after failed calls"
                if get("dropped"):
                    text += f", {_n(get('dropped'), 'sample')} dropped after failed calls"
            else:
                text = f"{table}: {get('generated')} conversations from {get('rows')} calls"
                if get("malformed"):
                    text += f", {_n(get('malformed'), 'malformed reply', 'malformed replies')} dropped (first: {self.first_malformed[table]})"
                if get("failed"):
                    text += f", {_n(get('failed'), 'failed call')} dropped"
            if get("missing"):
                text += f", {get('missing')} not in the cache"
            out.append(text)
        return out

    # --- lengthening ----------------------------------------------------------------

    def lengthen(self, frame: pl.DataFrame, source: SourcePlan, fields: dict[str, pl.Expr], answer: str) -> pl.DataFrame:
        """`frame` with column `answer` rewritten (and rows dropped under on_error = "drop")."""
        spec, plan = source.spec, source.lengthen
        assert plan is not None
        table, t = plan.table, plan.spec
        names = plan.fields
        values = frame.select(**{n: fields[n].fill_null("") for n in names})
        rows = frame[ROW]
        o = self.outcomes[spec.name]
        o[f"{table} rows"] += frame.height
        if t.method == "template":
            o[f"{table} lengthened"] += frame.height
            return frame.with_columns(_fill(plan.templates, plan.seed, spec.name, rows, values).alias(answer))
        assert t.prompt is not None and plan.cache is not None
        prompts = _fill([t.prompt], plan.seed, spec.name, rows, values)
        system = [{"role": "system", "content": t.system}] if t.system else []
        got = self.ask(table, table, t, plan.cache, system, prompts, rows, spec.name, plan.seed)
        reply = got["response"].str.strip_chars()
        reason = (
            pl.when(pl.col("error").is_not_null()).then(pl.col("error"))
            .when(pl.col("finish") == "length").then(pl.lit(f"the reply was cut at max_tokens = {t.max_tokens}"))
            .when(pl.col("response").str.strip_chars().fill_null("") == "").then(pl.lit("the reply is empty"))
        )
        got = got.with_columns(reason.alias("reason"), reply.alias("reply"))
        failed = got["reason"].is_not_null() & ~got["missing"]
        self.counts[table].failed += int(failed.sum())
        if t.on_error == "fail" and failed.any():
            self._raise_failed(table, t, got.filter(failed), spec.name)
        missing = got["missing"]
        ok = ~failed & ~missing
        o[f"{table} lengthened"] += int(ok.sum())
        o[f"{table} missing"] += int(missing.sum())
        new = pl.when(ok).then(got["reply"]).otherwise(values["answer"])
        frame = frame.with_columns(pl.select(new).to_series().alias(answer))
        if t.on_error == "drop":
            o[f"{table} dropped"] += int(failed.sum())
            return frame.filter(~failed)
        o[f"{table} kept"] += int(failed.sum())
        return frame

    # --- generation -----------------------------------------------------------------

    def generate(self, frame: pl.DataFrame, source: SourcePlan, context: dict[str, pl.Expr]) -> pl.DataFrame:
        """`frame` with a `conversations` column written by the LLM; a row whose call
        failed or whose reply is malformed is dropped. With conversations = n > 1, each
        context row gives n calls (seeds seed..seed+n-1), numbered row × n + k."""
        plan = source.generate
        assert plan is not None
        g, table, where = plan.spec, plan.table, plan.key
        values = frame.select(**{k: context[k].fill_null("") for k in g.fields})
        rows = frame[ROW]
        contexts = _fill([g.context], plan.seed, g.name, rows, values)
        prefix = self._seed_messages(plan)
        o = self.outcomes[g.name]
        parts = []
        for k in range(g.conversations):
            got = self.ask(table, where, g, plan.cache, prefix, contexts, rows, g.name, plan.seed + k)
            failed = got["error"].is_not_null() & ~got["missing"]
            self.counts[table].failed += int(failed.sum())
            if g.on_error == "fail" and failed.any():
                self._raise_failed(table, g, got.filter(failed).with_columns(pl.col("error").alias("reason")), g.name)
            states = pl.select(
                pl.when(got["missing"] | got["error"].is_not_null()).then(replies.ABSENT)
                .when(got["finish"] == "length").then(replies.TRUNCATED)
                .otherwise(replies.WHOLE)
            ).to_series().to_numpy()
            conversations, reasons = replies.parse_column(got["response"], states, g.reply, g.min_turns)
            malformed = reasons.is_not_null()
            if malformed.any() and table not in self.first_malformed:
                at = int(malformed.arg_true()[0])
                self.first_malformed[table] = f"row {rows[at]}: {reasons[at]}"
            o.update({f"{table} rows": frame.height, f"{table} malformed": int(malformed.sum()),
                      f"{table} failed": int(failed.sum()), f"{table} missing": int(got["missing"].sum())})
            part = frame.with_columns(conversations.alias("conversations"))
            if g.conversations > 1:
                part = part.with_columns((pl.col(ROW) * g.conversations + k).alias(ROW))
            parts.append(part.filter(pl.col("conversations").is_not_null()))
        out = pl.concat(parts).sort(ROW) if len(parts) > 1 else parts[0]
        o[f"{table} generated"] += out.height
        return out

    def _seed_messages(self, plan: GeneratePlan) -> list[dict[str, str]]:
        """System prompt and seed examples, read once per build (not per batch)."""
        if plan.table not in self._prefixes:
            g = plan.spec
            messages = [{"role": "system", "content": g.system}] if g.system else []
            if plan.seeds is not None:
                for context, reply in replies.load_seeds(plan.seeds, g.reply, plan.key):
                    messages += [{"role": "user", "content": context}, {"role": "assistant", "content": reply}]
            self._prefixes[plan.table] = messages
        return self._prefixes[plan.table]

    # --- calls ----------------------------------------------------------------------

    def _cache(self, path: Path) -> CallCache:
        if path not in self._caches:
            self._caches[path] = CallCache(path)
        return self._caches[path]

    def ask(
        self, table: str, where: str, spec: LLMSpec, cache_path: Path, prefix: list[dict[str, str]], texts: pl.Series, rows: pl.Series,
        source: str, seed: int,
    ) -> pl.DataFrame:
        """Per row: response, finish, error (from the cache or a new call) and whether the
        cache had nothing for it (`missing`, in a run that makes no calls)."""
        params = call_params(spec, seed)
        head = msgspec.json.encode({"format": 1, "model": spec.model, "params": params, "messages": prefix}) + b"\n"
        keys = _keys(head, texts)
        cache = self._cache(cache_path)
        counts = self.counts.setdefault(table, TableCounts())
        asked = pl.DataFrame({"key": keys, "text": texts, "row": rows})
        got = asked.join(cache.frame, on="key", how="left", maintain_order="left")
        need = got["response"].is_null() & got["error"].is_null()
        if self.retry_failed:
            need = need | got["error"].is_not_null()
        counts.rows += got.height
        counts.cached += got.height - int(need.sum())
        if need.any() and self.mode == "offline":
            lacking = got.filter(need)
            first = lacking.row(0, named=True)
            distinct = lacking["key"].n_unique()
            repeats = f" ({distinct} distinct prompts)" if distinct < lacking.height else ""
            raise LLMError(
                f"{where}: {lacking.height} of {got.height} calls for source '{source}' are not in the cache {cache.path}{repeats} "
                f"and --offline makes no calls (first: row {first['row']}). Build once with the endpoint up to fill the cache."
            )
        if need.any() and self.mode == "online":
            todo = got.filter(need).unique("key", keep="first", maintain_order=True)
            self._call(table, where, spec, prefix, params, todo, cache, source, counts)
            cache.refresh()
            got = asked.join(cache.frame, on="key", how="left", maintain_order="left")
            need = got["response"].is_null() & got["error"].is_null()
        counts.missing += int(need.sum())
        return got.with_columns(pl.Series("missing", need))

    def _client(self, table: str, spec: LLMSpec, where: str) -> ChatClient:
        if table not in self._clients:
            self._clients[table] = ChatClient(spec, where)
        return self._clients[table]

    def _call(
        self, table: str, where: str, spec: LLMSpec, prefix: list[dict[str, str]], params: dict[str, Any],
        todo: pl.DataFrame, cache: CallCache, source: str, counts: TableCounts,
    ) -> None:
        client = self._client(table, spec, where)
        on_error = getattr(spec, "on_error", "fail")
        pool = ThreadPoolExecutor(max_workers=spec.concurrency, thread_name_prefix="mmrecipe-llm")
        bar = self._bar(table, todo.height)
        lock = threading.Lock()

        def one(key: str, text: str, row: int) -> None:
            messages = [*prefix, {"role": "user", "content": text}]
            try:
                reply = client.complete(messages, params, stop)
                record = Record(key=key, table=table, model=spec.model or "", prompt=text, response=reply.text, finish=reply.finish)
            except EndpointUnreachable as e:
                raise LLMError(
                    f"{where}.endpoint: {e.reason}. Start the server, or build with --offline to use only the cache {cache.path}"
                ) from None
            except CallFailed as e:
                if on_error == "fail":
                    raise LLMError(
                        f"{where}: the call for source '{source}', row {row} failed: {e.reason} (on_error = \"fail\"; "
                        f"{_other_policies(spec)} would record it and go on)"
                    ) from None
                record = Record(key=key, table=table, model=spec.model or "", prompt=text, error=e.reason)
            cache.append(record)  # durable before the call counts as done
            with lock:
                counts.called += 1
                self._call_failures[table] += record.error is not None
                bar.update(1)
                bar.set_postfix_str(f"from cache {counts.cached:,}, failed {self._call_failures[table]:,}", refresh=False)

        stop = threading.Event()
        futures = [pool.submit(one, key, text, row) for key, text, row in todo.select("key", "text", "row").iter_rows()]
        try:
            pending = set(futures)
            while pending:
                # Woken now and then: a signal may land on a worker thread, and Ctrl-C
                # only reaches the main thread when it runs.
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                for fut in done:
                    if fut.exception() is not None and not isinstance(fut.exception(), Stopped):
                        fut.result()  # re-raises the first fatal error
        finally:
            # On a fatal error or Ctrl-C: nothing new starts, no call retries; a call in
            # flight may still finish, and its record is kept.
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)

    def _bar(self, table: str, more: int) -> Any:
        """The table's progress bar (calls, with rate and ETA), grown by `more` calls: one
        bar for all the batches of a streamed source."""
        from tqdm.auto import tqdm

        if table not in self._bars:
            self._bars[table] = tqdm(total=0, desc=table, unit="call", disable=not self.progress, file=sys.stderr, dynamic_ncols=True, leave=False)
        bar = self._bars[table]
        bar.total += more
        bar.refresh()
        return bar

    def _raise_failed(self, table: str, spec: LLMSpec, failed: pl.DataFrame, source: str) -> None:
        first = failed.row(0, named=True)
        raise LLMError(
            f"{table}: {failed.height} call{'s' if failed.height > 1 else ''} for source '{source}' failed "
            f"(first: row {first['row']}: {first['reason']}); on_error = \"fail\". Use --retry-failed to ask again "
            f"for calls recorded as failed, or on_error = {_other_policies(spec)}."
        )


def _other_policies(spec: LLMSpec) -> str:
    """The on_error values that record a failed call and go on."""
    return '"drop"' if isinstance(spec, (GenerateSpec, PoolGenerateSpec)) else '"keep" or "drop"'


def _n(count: int, one: str, many: str | None = None) -> str:
    """`count` with the singular or the plural."""
    return f"{count} {one if count == 1 else many or one + 's'}"


def _fill(templates: list[str], seed: int, stream: str, rows: pl.Series, values: pl.DataFrame) -> pl.Series:
    """Filled templates per row, in Rust (same placeholder rules as instruction templates)."""
    columns = [string_buffers(arrow(values[c])) for c in values.columns]
    row_ids = rows.to_numpy().astype(np.uint64, copy=False)
    try:
        offsets, data = _core.fill_templates(templates, seed, stream, row_ids, list(values.columns), columns)
    except ValueError as e:
        raise LLMError(f"{stream}: {e}") from None
    return pl.from_arrow(strings(offsets, data)).cast(pl.String)  # type: ignore[return-value]


def _keys(head: bytes, texts: pl.Series) -> pl.Series:
    offsets, data = string_buffers(arrow(texts))
    hexes = _core.content_keys(head, offsets, data)
    key_offsets = np.arange(0, 64 * (len(texts) + 1), 64, dtype=np.int64)
    return pl.from_arrow(strings(key_offsets, hexes)).cast(pl.String).alias("key")  # type: ignore[union-attr]
