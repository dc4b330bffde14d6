"""`blockpress trace`: where one job's time went, or the figures across many jobs.

    blockpress trace JOB_ID [--json | --html FILE | --format text|json|html|chrome [-o FILE]]
    blockpress trace stats [--last N] [--model M] [--since T] [--label NAME] [--json]
    blockpress trace stats --compare LABEL_A LABEL_B
    blockpress trace diff A B        # each side: a job id, `model=M,since=T,until=T,last=N`, or `@LABEL`

The CLI plugs this in with `add_trace_commands(subparsers)`; the parser it adds calls `run_trace(args)`
through `args.func`. One job's trace comes from the gateway (`GetTrace`, `--address`), so it works
against a fresh `blockpress serve`; with `--redis-url` it is read from the trace store directly.
`stats` reads the trace store: `--redis-url`, else `BLOCKPRESS_REDIS_URL`, else the local default.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from blockpress.runtime.tracing.diff import Profile, profile, render_diff
from blockpress.runtime.tracing.export import to_chrome
from blockpress.runtime.tracing.page import render_html
from blockpress.runtime.tracing.stats import Summary, render_comparison, render_summary, summarize
from blockpress.runtime.tracing.store import SpanRecord, TraceStore
from blockpress.runtime.tracing.view import render_text, to_json

__all__ = ["add_trace_commands", "parse_since", "run_trace"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_trace_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add `trace` to an argparse subparsers object; returns the new parser."""
    p = subparsers.add_parser(
        "trace",
        help="show where a job's time went, or latency figures across jobs",
        description="`trace JOB_ID` shows one job's waterfall; `trace stats` summarises recent jobs.",
    )
    p.add_argument("target", metavar="JOB_ID|stats|diff", help="a job id (or trace id), `stats` or `diff`")
    p.add_argument(
        "sides",
        nargs="*",
        metavar="SIDE",
        help="diff: two sides, each a job id, a filter over recent jobs `model=M,since=T,until=T,last=N`, "
        "or `@LABEL` (a run kept with `trace stats --label`)",
    )
    p.add_argument("--address", help="gateway host:port (default BLOCKPRESS_ADDRESS, then 127.0.0.1:50051)")
    p.add_argument("--api-key", default=None, help="API key for the gateway (default: BLOCKPRESS_API_KEY)")
    p.add_argument("--redis-url", help="read the trace store directly (stats default: BLOCKPRESS_REDIS_URL, local)")
    show = p.add_argument_group("one job")
    out = show.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the spans as JSON (also for stats)")
    out.add_argument("--html", metavar="FILE", type=Path, help="write a self-contained HTML page")
    out.add_argument(
        "--format",
        choices=("text", "json", "html", "chrome"),
        help="chrome: trace-event JSON for Perfetto (ui.perfetto.dev) or chrome://tracing",
    )
    show.add_argument("-o", "--output", metavar="FILE", type=Path, help="write --format output here")
    stats = p.add_argument_group("stats")
    stats.add_argument("--last", type=int, default=100, metavar="N", help="the N most recent jobs (100)")
    stats.add_argument("--model", metavar="M", help="only jobs of this model")
    stats.add_argument("--since", metavar="T", help="only jobs started after T: 30m, 2h, 1d, ISO time, epoch s")
    stats.add_argument("--label", metavar="NAME", help="keep this summary under NAME for --compare")
    stats.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two labelled runs side by side")
    p.set_defaults(func=run_trace)
    return p


def parse_since(text: str, *, now: float | None = None) -> float:
    """Epoch seconds from `30m`/`2h`/`1d` (ago), an ISO 8601 time, or epoch seconds."""
    now = time.time() if now is None else now
    if m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text):
        return now - float(m[1]) * _UNITS[m[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--since: {text!r} is not 30m/2h/1d, an ISO time or epoch seconds") from None
    return moment.timestamp()


def run_trace(args: argparse.Namespace, *, store: TraceStore | None = None, out: TextIO | None = None) -> int:
    """Run `blockpress trace` for parsed arguments; returns the exit status."""
    out = out or sys.stdout
    if store is None and (args.redis_url or args.target in ("stats", "diff")):
        from blockpress.runtime.config import RuntimeSettings

        # Settings fields all have defaults; mypy without the pydantic plugin cannot see that.
        settings = RuntimeSettings()  # type: ignore[call-arg]
        store = TraceStore.from_url(args.redis_url or settings.redis_url_or_default())
    if args.target == "stats":
        assert store is not None
        return _stats(args, store, out)
    if args.target == "diff":
        assert store is not None
        return _diff(args, store, out)
    spans = store.get_trace(args.target) if store is not None else _from_gateway(args)
    if not spans:
        print(
            f"no trace kept for {args.target!r} (unknown job, tracing off, or past retention)",
            file=sys.stderr,
        )
        return 1
    # Callers that build the namespace themselves (tests, the demo) may leave the newer options out.
    page: Path | None = getattr(args, "html", None)
    fmt = getattr(args, "format", None) or ("json" if getattr(args, "json", False) else "html" if page else "text")
    target: Path | None = page if page is not None else getattr(args, "output", None)
    if fmt == "html" and target is None:
        print("--format html needs -o FILE (or --html FILE)", file=sys.stderr)
        return 2
    render = {"text": render_text, "json": to_json, "html": render_html, "chrome": to_chrome}[fmt]
    if target is None:
        print(render(spans), file=out)
    else:
        target.write_text(render(spans), encoding="utf-8")
        print(f"wrote {target} ({len(spans)} spans)", file=out)
    return 0


def _from_gateway(args: argparse.Namespace) -> list[SpanRecord]:
    from blockpress.runtime import Client
    from blockpress.runtime.contracts.errors import NotFound

    with Client(getattr(args, "address", None), api_key=getattr(args, "api_key", None)) as client:
        try:
            return client.trace(args.target)
        except NotFound:
            return []


def _stats(args: argparse.Namespace, store: TraceStore, out: TextIO) -> int:
    if args.compare:
        runs = [store.load_run(label) for label in args.compare]
        missing = [label for label, run in zip(args.compare, runs, strict=True) if run is None]
        if missing:
            print(
                f"no run labelled {', '.join(missing)}; make one with `trace stats --label NAME`",
                file=sys.stderr,
            )
            return 1
        a, b = (Summary.from_dict(r) for r in runs if r is not None)
        print(render_comparison(a, b, (args.compare[0], args.compare[1])), file=out)
        return 0
    try:
        since = None if args.since is None else parse_since(args.since)
    except argparse.ArgumentTypeError as exc:
        print(exc, file=sys.stderr)
        return 2
    ids = store.recent_traces(args.last, model=args.model, since=since)
    traces = [store.get_trace(trace_id) for trace_id in ids]
    summary = summarize(traces)
    if summary.traces == 0:
        print("no traces match", file=sys.stderr)
        return 1
    if args.label:
        # The profile rides along so that `trace diff @LABEL` works after the traces expired.
        store.save_run(args.label, {**summary.to_dict(), "profile": profile(traces).to_dict()})
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2), file=out)
    else:
        print(render_summary(summary, label=args.label), file=out)
    return 0


_FILTER_KEYS = ("model", "since", "until", "last")


def side_profile(store: TraceStore, text: str) -> Profile:
    """The profile one `trace diff` side names: `@LABEL`, a `key=value,...` filter, or a job/trace id.

    Raises:
        ValueError: the side names nothing kept, or a filter is malformed.
    """
    if text.startswith("@"):
        run = store.load_run(text[1:])
        if run is None or "profile" not in run:
            raise ValueError(f"no run labelled {text[1:]!r} with a profile; keep one with `trace stats --label`")
        return Profile.from_dict(run["profile"])
    if "=" in text:
        fields: dict[str, str] = {}
        for part in filter(None, text.split(",")):
            key, _, value = part.partition("=")
            if key.strip() not in _FILTER_KEYS or not value:
                raise ValueError(f"{part!r}: a filter is key=value with key one of {', '.join(_FILTER_KEYS)}")
            fields[key.strip()] = value.strip()
        try:
            since = parse_since(fields["since"]) if "since" in fields else None
            until = parse_since(fields["until"]) if "until" in fields else None
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc).replace("--since", "since/until")) from None
        ids = store.recent_traces(int(fields.get("last", 100)), model=fields.get("model"), since=since, until=until)
        found = profile(store.get_trace(i) for i in ids)
    else:
        found = profile([store.get_trace(text)])
    if found.jobs == 0:
        raise ValueError(f"no traces for {text!r} (unknown job, empty filter, or past retention)")
    return found


def _diff(args: argparse.Namespace, store: TraceStore, out: TextIO) -> int:
    if len(args.sides) != 2:
        print("trace diff takes two sides: A B (job ids, filters like model=M,since=2h,until=1h, or @LABEL)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        a, b = (side_profile(store, side) for side in args.sides)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"a": a.to_dict(), "b": b.to_dict()}, indent=2), file=out)
    else:
        print(render_diff(a, b, (args.sides[0], args.sides[1])), file=out)
    return 0
