"""Prefill/decode disaggregation end to end, with a real transformer.

Three processes on this host: a ``kvstore serve`` node, a prefill worker and
a decode worker. Each worker builds the same small Llama-architecture model
from a config and a fixed seed (nothing is downloaded) and talks to the node
through ``Client.connect``. Two requests share a long system prompt:

1. the decode worker answers request A with no store (the cold baseline:
   the whole prompt is computed);
2. the prefill worker prefills A and puts its KV;
3. the decode worker answers A again: it loads the cached prefix, computes
   only the uncached suffix and decodes greedily (warm);
4. the prefill worker prefills B, which reuses the system prompt's blocks
   and computes only the rest; the decode worker answers B cold and warm.

It prints each step (tokens cached and computed, TTFT), TTFT cold vs warm as
a ratio, the prefill tokens saved, the node's lookup hit rate, and checks
that every warm answer is token for token the cold one.

Run: ``kvstore demo pd`` or ``python -m bench.pd`` (``--quick``, ``--json``,
``--rounds``; ``--system-tokens``, ``--question-tokens``, ``--new-tokens``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench.procs import start_serve
from bench.report import Row, bench_parser, print_table

SEED = 0


@dataclass(frozen=True)
class Step:
    request: str
    worker: str
    store: bool  # loads from the store (and, for the prefill worker, saves)
    cached: int
    computed: int
    ttft_ms: float
    tokens: list[int]


# -- the worker process: JSON requests on stdin, JSON answers on stdout ----------


def _worker(url: str, role: str, block_size: int, transfer: str) -> None:
    from client import Client
    from client.engines.hf import HFKV, generate, model_namespace, tiny_llama

    torch.set_num_threads(1)  # two workers share the host; neither takes it all
    model = tiny_llama(SEED)
    ns = model_namespace(model, block_size=block_size, name="tiny-llama")
    generate(model, list(range(64)), 2)  # first-call allocations stay out of the timings
    with Client.connect(url, namespace=ns, transfer=transfer) as client:
        kv = HFKV(client, model)
        print(json.dumps({"ready": role, "namespace": ns.model}), flush=True)
        for line in sys.stdin:
            req = json.loads(line)
            g = generate(
                model,
                req["prompt"],
                req["new_tokens"],
                kv=kv if req["store"] else None,
                save=role == "prefill",
            )
            answer = {
                "cached": g.cached,
                "computed": g.computed,
                "ttft_s": g.ttft_s,
                "tokens": g.tokens,
                "saved": g.saved,
            }
            print(json.dumps(answer), flush=True)


class Worker:
    def __init__(self, url: str, role: str, block_size: int, transfer: str) -> None:
        self.role = role
        cmd = [sys.executable, "-m", "bench.pd", "--worker", role, "--url", url]
        cmd += ["--block-size", str(block_size), "--transfer", transfer]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.namespace = str(self._read()["namespace"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.role} worker exited with {self.proc.wait()}")
        return dict(json.loads(line))

    def run(
        self, request: str, prompt: list[int], new_tokens: int, *, store: bool, rounds: int = 1
    ) -> Step:
        """The request ``rounds`` times; the median TTFT of the rounds."""
        assert self.proc.stdin is not None
        answers = []
        for _ in range(rounds):
            msg = {"prompt": prompt, "new_tokens": new_tokens, "store": store}
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            answers.append(self._read())
        last = answers[-1]
        if any(a["tokens"] != last["tokens"] for a in answers):
            raise AssertionError(f"{request}: the {self.role} worker's rounds disagree")
        return Step(
            request,
            self.role,
            store,
            int(last["cached"]),
            int(last["computed"]),
            statistics.median(a["ttft_s"] for a in answers) * 1e3,
            list(last["tokens"]),
        )

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self.proc.wait(timeout=60) != 0:
            raise RuntimeError(f"the {self.role} worker exited with {self.proc.returncode}")


# -- the demo ------------------------------------------------------------------


def run_demo(
    *,
    system_tokens: int,
    question_tokens: int,
    new_tokens: int,
    block_size: int,
    rounds: int,
    transfer: str,
) -> dict[str, Any]:
    from client.remote import RemoteStore

    gen = torch.Generator().manual_seed(SEED + 1)
    system = torch.randint(0, 32000, (system_tokens,), generator=gen).tolist()
    prompts = {
        q: system + torch.randint(0, 32000, (question_tokens,), generator=gen).tolist()
        for q in ("A", "B")
    }
    node, summary = start_serve(
        "--dram-capacity", "256MiB", "--ssd-path", "none", "--transfer", transfer
    )
    url = str(summary["url"])
    workers: list[Worker] = []
    try:
        prefill = Worker(url, "prefill", block_size, transfer)
        workers.append(prefill)
        decode = Worker(url, "decode", block_size, transfer)
        workers.append(decode)
        if prefill.namespace != decode.namespace:
            raise AssertionError("the workers built different weights")
        steps = [
            decode.run("A", prompts["A"], new_tokens, store=False, rounds=rounds),
            prefill.run("A", prompts["A"], 1, store=True),
            decode.run("A", prompts["A"], new_tokens, store=True, rounds=rounds),
            prefill.run("B", prompts["B"], 1, store=True),
            decode.run("B", prompts["B"], new_tokens, store=False, rounds=rounds),
            decode.run("B", prompts["B"], new_tokens, store=True, rounds=rounds),
        ]
        node_client = RemoteStore(url)
        stats = node_client.stats()
        node_client.close()
        for w in workers:
            w.close()
        workers.clear()
    finally:
        for w in workers:
            w.proc.kill()
        node.terminate()
        node.wait(timeout=60)
    cold = {s.request: s for s in steps if s.worker == "decode" and not s.store}
    warm = {s.request: s for s in steps if s.worker == "decode" and s.store}
    for q in ("A", "B"):
        if warm[q].tokens != cold[q].tokens:
            raise AssertionError(f"request {q}: warm decode {warm[q].tokens} != {cold[q].tokens}")
    prompt_tokens = sum(len(p) for p in prompts.values())
    saved = sum(s.cached for s in steps if s.store)
    return {
        "steps": [asdict(s) for s in steps],
        "ttft_cold_ms": {q: cold[q].ttft_ms for q in cold},
        "ttft_warm_ms": {q: warm[q].ttft_ms for q in warm},
        "prefill_tokens_saved": saved,
        "prefill_tokens_with_store": sum(s.cached + s.computed for s in steps if s.store),
        "prompt_tokens": prompt_tokens,
        "lookup_hit_rate": stats.lookup_hit_rate,
        "tokens_match": True,
    }


def _print(result: dict[str, Any], rounds: int) -> None:
    print(f"\n{'request':8} {'worker':8} {'store':6} {'cached':>7} {'computed':>9} {'TTFT ms':>9}")
    for s in result["steps"]:
        store = "yes" if s["store"] else "no"
        print(
            f"{s['request']:8} {s['worker']:8} {store:6} {s['cached']:>7} {s['computed']:>9} "
            f"{s['ttft_ms']:>9.1f}   first tokens {s['tokens'][:4]}"
        )
    rows = [
        Row(
            f"TTFT request {q}, warm (decode worker)",
            result["ttft_warm_ms"][q],
            "ms",
            "cold (whole prompt computed)",
            result["ttft_cold_ms"][q],
            higher_is_better=False,
        )
        for q in ("A", "B")
    ]
    print_table(f"TTFT, median of {rounds} rounds", rows, as_json=False)
    done = result["prefill_tokens_with_store"]
    print(
        f"\nprefill tokens saved: {result['prefill_tokens_saved']} of {done} "
        f"({result['prefill_tokens_saved'] / done:.0%}) in the steps that used the store; "
        f"node lookup hit rate {result['lookup_hit_rate']:.0%}; "
        "warm decodes match the cold ones token for token"
    )


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("pd", __doc__, rounds="timed repeats of each decode step", rounds_default=3)
    p.prog = "kvstore demo pd"
    p.add_argument("--system-tokens", type=int, default=2048, help="shared system prompt")
    p.add_argument("--question-tokens", type=int, default=256, help="each request's own part")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens each decode generates")
    p.add_argument("--block-size", type=int, default=16, help="tokens per store block")
    p.add_argument("--transfer", default="tcp", help="the node's transfer backend (tcp, shm)")
    p.add_argument("--worker", choices=("prefill", "decode"), help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.url, args.worker, args.block_size, args.transfer)
        return 0
    if args.quick:
        args.system_tokens, args.question_tokens, args.new_tokens = 256, 40, 4
        args.rounds = 1
    result = run_demo(
        system_tokens=args.system_tokens,
        question_tokens=args.question_tokens,
        new_tokens=args.new_tokens,
        block_size=args.block_size,
        rounds=args.rounds,
        transfer=args.transfer,
    )
    if args.json:
        print(json.dumps(result))
    else:
        _print(result, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
