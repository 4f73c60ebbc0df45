"""Hit rate of each eviction policy on two workloads, beside LRU and Belady's MIN.

The workloads: the Mooncake trace (``--trace``; 3,993 requests sharing
512-token blocks) and ``bench.workloads.chat`` (multi-turn conversations with
one-shot documents, written as token lists and keyed with the real key
function). Every policy replays through a real ``TieredStore`` (see
``kvstore.tools.replay``) at each capacity, given as a share of the workload's
distinct blocks. Two tables per workload: each policy against plain LRU (the
default policy should never be below 1.00x) and against OPT (the issue's
target for the default: 0.8x at 5% on the Mooncake trace).

Run: ``python -m bench.replay`` or ``kvstore bench replay`` (``--quick``,
``--json``, ``--policy``, ``--capacity``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.report import Row, bench_parser, print_table
from bench.workloads import chat, write_tokens
from kvstore.eviction import DEFAULT_POLICY
from kvstore.tools.replay import Result, Trace, capacities, load_trace, run_all

TRACE = Path(__file__).resolve().parents[2] / "shared/data/traces/mooncake_synthetic_trace.jsonl"
OPT_TARGET = (0.05, 0.8)  # capacity share and ratio to OPT the default policy should reach


def tables(name: str, trace: Trace, policies: list[str], spec: str) -> list[tuple[str, list[Row]]]:
    sizes = capacities(spec, trace.distinct)
    results = run_all(trace, [*policies, "lru"], sizes)
    by = {(r.policy, r.capacity): r for r in results}
    vs_lru: list[Row] = []
    vs_opt: list[Row] = []
    for size in sizes:
        share = size / trace.distinct
        lru, opt = by[("lru", size)], by[("OPT", size)]
        for p in policies:
            r = by[(p, size)]
            label = f"{share:.0%}: {p}"
            default = p == DEFAULT_POLICY
            vs_lru.append(_row(label, r, "lru", lru, 1.0 if default else None))
            hit = default and name == "mooncake" and round(share, 2) == OPT_TARGET[0]
            vs_opt.append(_row(label, r, "OPT (Belady)", opt, OPT_TARGET[1] if hit else None))
    head = f"{name}: {len(trace.requests)} requests, {trace.distinct} distinct blocks"
    return [(f"{head}, hit rate vs plain LRU", vs_lru), (f"{head}, hit rate vs OPT", vs_opt)]


def _row(label: str, r: Result, base_name: str, base: Result, target: float | None) -> Row:
    return Row(label, 100 * r.hit_rate, "%", base_name, 100 * base.hit_rate, target=target)


def main() -> None:
    p = bench_parser("replay", __doc__, rounds="unused", quick="the first 400 requests, 2 sizes")
    p.add_argument("--trace", default=str(TRACE), help="the Mooncake trace (skipped if missing)")
    p.add_argument("--policy", default=f"{DEFAULT_POLICY},arc+tail,prefix-lru")
    p.add_argument("--capacity", default="1%,5%,10%,25%")
    p.add_argument("--chat-requests", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0, help="the chat workload's seed")
    args = p.parse_args()
    limit = 400 if args.quick else 0
    spec = "5%,25%" if args.quick else args.capacity
    policies = [x.strip() for x in args.policy.split(",") if x.strip() and x.strip() != "lru"]
    out: list[tuple[str, list[Row]]] = []
    if Path(args.trace).exists():
        out += tables("mooncake", load_trace(args.trace, limit=limit), policies, spec)
    else:
        print(f"(no Mooncake trace at {args.trace}: only the chat workload)", file=sys.stderr)
    n = min(args.chat_requests, limit or args.chat_requests)
    with tempfile.TemporaryDirectory(prefix="kvstore-chat-") as tmp:
        path = write_tokens(Path(tmp) / "chat.jsonl", chat(n, seed=args.seed))
        trace = load_trace(path, "tokens", block_size=16)
    out += tables(f"chat (seed {args.seed})", trace, policies, spec)
    for title, rows in out:
        print_table(title, rows, as_json=args.json)


if __name__ == "__main__":
    main()
