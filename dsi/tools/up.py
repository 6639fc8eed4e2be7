"""``dsi up``: target replica(s), a drafter and a coordinator as local processes.

Each service runs as its own ``dsi`` process (the same commands a deployment
runs), on a free port, logging to a file under ``--log-dir``. With ``--demo`` it
runs one prompt with every strategy, prints the comparison and stops;
otherwise it serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsi.domain.errors import InvalidArgument, NotFound, Unavailable
from dsi.domain.types import CHAIN
from dsi.serving.args import lookahead as lookahead_arg
from dsi.serving.args import tree_shape
from dsi.serving.tracing import add_tracing_argument

# Latencies like a 13B target and a 68M drafter, each on its own data-centre
# GPU (the Vicuna-13B / Vicuna-68M pair of the DSI paper); acceptance as
# measured for such pairs. `dsi up --synthetic` (and `dsi bench`) use them.
SYNTHETIC_TARGET = "synthetic:vocab=32000,seed=1,ttft_ms=40,tpot_ms=30"
SYNTHETIC_DRAFTER = "synthetic:vocab=32000,seed=1,ttft_ms=3,tpot_ms=2,acceptance=0.7"
DEMO_PROMPT_IDS = "1,2,3,4,5,6,7,8"
# --demo's prompt for the real pair (of the 12 everyday prompts of tools/demo_quality.py, the one whose
# greedy completion reads most like real code), and its sampled run (after the greedy one).
DEMO_PROMPT = "def read_file(path):"
DEMO_TEMPERATURE = 0.8
DEMO_SEED = 1
# One run per strategy is at the mercy of whatever else the machine does for those seconds: --demo times
# each strategy this many times (interleaved) and compares the medians.
DEMO_ROUNDS = 3

# The default pair: a small Python-code target and its distilled drafter, trained
# by tools/train_demo_models.py and committed under the repository's models/.
DEMO_TARGET = "pycoder-5m"
DEMO_DRAFTER = "pycoder-2m-drafter"
MODELS_ENV = "DSI_MODELS_DIR"
MAX_DEFAULT_TARGETS = 4


def demo_models_dir() -> Path:
    """``$DSI_MODELS_DIR``, else ``models/`` beside the ``dsi`` package: the
    repository root of a checkout or an editable install. A built wheel does not
    carry the models (13 MB); point ``DSI_MODELS_DIR`` at a checkout's models/."""
    env = os.environ.get(MODELS_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "models"


def resolve_models(args: argparse.Namespace) -> None:
    """Fill in the model specs left unset: the synthetic pair with
    ``--synthetic``, else the shipped demo pair (an error if it is missing)."""
    if getattr(args, "synthetic", False):
        args.target_model = args.target_model or SYNTHETIC_TARGET
        args.drafter_model = args.drafter_model or SYNTHETIC_DRAFTER
        return
    root = demo_models_dir()
    for attr, name in (("target_model", DEMO_TARGET), ("drafter_model", DEMO_DRAFTER)):
        if getattr(args, attr) is None:
            path = root / name
            if not (path / "config.json").is_file():
                raise NotFound(
                    f"the demo model {path} is missing (the demo pair ships in the source repository's models/"
                    f" folder, not in a wheel): set {MODELS_ENV} to a checkout's models/, pass --target-model"
                    " and --drafter-model, or use --synthetic"
                )
            setattr(args, attr, str(path))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target-model",
        default=None,
        metavar="SPEC",
        help=f"target model directory or synthetic spec (default: the shipped {DEMO_TARGET} Python-code model)",
    )
    p.add_argument(
        "--drafter-model",
        default=None,
        metavar="SPEC",
        help=f"drafter model directory or synthetic spec (default: the shipped {DEMO_DRAFTER}, distilled from it)",
    )
    p.add_argument(
        "--ngram-drafter",
        nargs="?",
        const="ngram",
        default=None,
        metavar="SPEC",
        help="also draft by prompt lookup, inside the coordinator (no model, no process): an ngram[:n=3,min_n=2,k=8]"
        " spec (default when given without one: ngram). The model drafter stays the primary",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="default to the synthetic pair instead: a 13B-like target (30 ms per forward pass) and a 68M-like"
        " drafter (2 ms per token, 70%% acceptance), no model files needed",
    )
    p.add_argument(
        "--targets",
        type=int,
        default=None,
        metavar="N",
        help=f"target replicas = SP degree (default: {MAX_DEFAULT_TARGETS}; with real models on --device cpu, one per"
        f" core up to {MAX_DEFAULT_TARGETS}, since replicas on the same cores cannot verify in parallel)",
    )
    p.add_argument("--device", default="cpu", help="device for Hugging Face models (default: %(default)s)")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="CPU threads per model process (default 0: on --device cpu, the machine's cores shared evenly among"
        " the target replicas and the drafter, at least 1 each)",
    )
    p.add_argument("--host", default="127.0.0.1", help="coordinator address (default: %(default)s)")
    p.add_argument("--port", type=int, default=50050, help="coordinator port (default: %(default)s)")
    p.add_argument("--strategy", choices=["nonsi", "si", "dsi"], default="dsi")
    p.add_argument(
        "--lookahead",
        type=lookahead_arg,
        default=5,
        metavar="N|auto",
        help="the coordinator's default lookahead (default: 5, not auto as for `dsi coordinator`: with every"
        " service on one machine's cores, DSI's automatic lookahead was 1-9%% slower than 5 on the demo pair)",
    )
    p.add_argument(
        "--tree",
        type=tree_shape,
        default=CHAIN,
        metavar="WxD",
        help="draft token trees of this shape by default (e.g. 3x2; default: chains)",
    )
    p.add_argument("--max-new-tokens", type=int, default=100, help="default generation length (default: %(default)s)")
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve the coordinator's OpenAI-compatible API on this port (0 = any free port; default: off)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve the coordinator's Prometheus /metrics on this port (0 = any free port; default: off)",
    )
    add_tracing_argument(p)  # passed on to every service
    p.add_argument("--log-dir", help="where service logs go (default: a new temporary folder)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--demo", action="store_true", help="generate once with non-SI, SI and DSI, print the comparison and stop"
    )
    g.add_argument("--prompt", help="generate once from this text prompt and stop")
    p.add_argument(
        "--temperature",
        type=float,
        default=DEMO_TEMPERATURE,
        help="temperature of --demo's sampled run, after the greedy one (0: greedy only; default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DEMO_SEED,
        help="seed of --demo's sampled run: the same seed gives the same text under every strategy"
        " (default: %(default)s)",
    )
    p.add_argument(
        "--demo-rounds",
        type=int,
        default=DEMO_ROUNDS,
        metavar="N",
        help="--demo times each strategy N times, interleaved, and compares the medians (after one untimed warm-up"
        " generation each; default: %(default)s)",
    )
    p.add_argument(
        "--prompt-ids",
        default=None,
        metavar="1,2,3",
        help=f"prompt token ids for --demo with synthetic models (default: {DEMO_PROMPT_IDS})",
    )


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    announce: Path
    log: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Cluster:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    async def spawn(self, name: str, *argv: str) -> Child:
        announce = self.log_dir / f"{name}.addr"
        log = self.log_dir / f"{name}.log"
        with contextlib.suppress(FileNotFoundError):
            announce.unlink()
        with open(log, "wb") as fh:  # noqa: ASYNC230 - a local file, once per child
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "dsi",
                *argv,
                "--announce",
                str(announce),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fh,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order
            )
        child = Child(name, proc, announce, log)
        self.children.append(child)
        return child

    async def address(self, child: Child, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not child.announce.exists():
            if child.proc.returncode is not None:
                raise Unavailable(f"{child.name} exited with code {child.proc.returncode}:\n{child.tail()}")
            if time.monotonic() > deadline:
                raise Unavailable(f"{child.name} did not start within {timeout:g}s:\n{child.tail()}")
            await asyncio.sleep(0.05)
        return child.announce.read_text().strip()

    async def stop(self, grace: float = 10.0) -> None:
        # Coordinator first, so nothing new reaches the model servers.
        for child in reversed(self.children):
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(child.proc.wait(), grace)
                except asyncio.TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()
                    await child.proc.wait()


def synthetic_target(args: argparse.Namespace) -> bool:
    """Whether the target is a synthetic spec (imported here, not at the top:
    ``dsi --help`` builds this parser and need not load the backends)."""
    from dsi.backends import is_synthetic

    return is_synthetic(args.target_model)


def default_targets(args: argparse.Namespace) -> int:
    """4 replicas, except real models on the CPU: one per core (at most 4). On a
    2-core machine 4 CPU replicas verify no faster than 2, and DSI's lead over SI
    (2.4x vs 1.7-1.9x over non-SI with 2, docs/models.md) shrinks to nothing."""
    if args.device == "cpu" and not synthetic_target(args):
        return max(1, min(MAX_DEFAULT_TARGETS, os.cpu_count() or 1))
    return MAX_DEFAULT_TARGETS


def model_threads(args: argparse.Namespace) -> int:
    """Threads for each model process: ``--threads``, else on the CPU the cores
    split among the processes (N replicas plus a drafter would otherwise each
    start one thread per core and fight over them); 0 (torch's default) on an
    accelerator."""
    if args.threads or args.device != "cpu":
        return args.threads
    return max(1, (os.cpu_count() or 1) // (args.targets + 1))


async def start(args: argparse.Namespace, cluster: Cluster) -> str:
    common = ["--host", "127.0.0.1", "--port", "0", "--log-format", "json"]
    if args.otlp_endpoint:
        common += ["--otlp-endpoint", args.otlp_endpoint]
    model = ["--device", args.device, "--dtype", args.dtype, "--threads", str(model_threads(args))]
    targets = [
        await cluster.spawn(f"target-{i}", "target", "--model", args.target_model, *model, *common)
        for i in range(args.targets)
    ]
    drafter = await cluster.spawn("drafter", "drafter", "--model", args.drafter_model, *model, *common)
    target_addrs = [await cluster.address(c, args.startup_timeout) for c in targets]
    drafter_addr = await cluster.address(drafter, args.startup_timeout)
    argv = [
        "coordinator",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--log-format",
        "json",
        "--strategy",
        args.strategy,
        "--lookahead",
        str(args.lookahead),
        "--tree",
        str(args.tree),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--drafter",
        drafter_addr,
        *(["--drafter", args.ngram_drafter] if args.ngram_drafter else []),
        *(["--otlp-endpoint", args.otlp_endpoint] if args.otlp_endpoint else []),
    ]
    for a in target_addrs:
        argv += ["--target", a]
    for flag, port in (("--http-port", args.http_port), ("--metrics-port", args.metrics_port)):
        if port is not None:
            argv += [flag, str(port)]
    if not synthetic_target(args):
        argv += ["--tokenizer", args.target_model]
    coordinator = await cluster.spawn("coordinator", *argv)
    return await cluster.address(coordinator, args.startup_timeout)


def served_urls(log: Path) -> list[str]:
    """The HTTP endpoints the coordinator logged before it announced itself."""
    urls = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and "url" in rec:
                urls.append(f"{rec.get('msg', 'serving')}: {rec['url']}")
    return urls


def show_completion(prompt: str, ids: list[int], text: str) -> None:
    """The prompt and its completion as the code they make (repr for ids)."""
    if prompt:
        print("   " + (prompt + text).replace("\n", "\n   "))
    else:
        print(f"   prompt ids {ids}: {text!r}")


STRATEGIES = ("nonsi", "si", "dsi")


async def warm_up(client: Any, prompt: str, ids: list[int], tokens: int = 16) -> None:
    """One short untimed generation per strategy: the first forward pass of a
    model process (allocations, the gRPC channels) is several times slower than
    the next, and would otherwise count against whichever strategy runs first."""
    from dsi.wire.client import request

    for strategy in STRATEGIES:
        await client.generate(request(prompt, ids, tokens, strategy))


async def compare(
    client: Any, prompt: str, ids: list[int], args: argparse.Namespace, temperature: float, seed: int | None
) -> tuple[dict[str, Any], bool]:
    """``--demo-rounds`` generations per strategy (non-SI, SI, DSI) with the same
    settings, interleaved (each round in a rotated order); each strategy's
    median-time run, printed with every time and the speedups of the medians,
    and whether all of them gave the same tokens."""
    from dsi.tools.cli import stats_line
    from dsi.wire.client import request

    runs: dict[str, list[Any]] = {s: [] for s in STRATEGIES}
    for k in range(args.demo_rounds):
        for strategy in STRATEGIES[k % 3 :] + STRATEGIES[: k % 3]:
            req = request(prompt, ids, args.max_new_tokens, strategy, temperature=temperature, seed=seed)
            runs[strategy].append(await client.generate(req))
    results = {s: sorted(rs, key=lambda r: r.stats["wall_seconds"])[len(rs) // 2] for s, rs in runs.items()}
    show_completion(prompt, ids, results["dsi"].text)
    print()
    for strategy, r in results.items():
        print(f"{strategy:>6} {stats_line(r)}")
    if args.demo_rounds > 1:
        print(
            f"(each line: the median of {args.demo_rounds} runs, interleaved; wall seconds "
            + "; ".join(f"{s} " + " ".join(f"{r.stats['wall_seconds']:.3f}" for r in rs) for s, rs in runs.items())
            + ")"
        )
    base = results["nonsi"].stats["wall_seconds"]
    same = len({tuple(r.token_ids) for rs in runs.values() for r in rs}) == 1
    print(
        "speedup over non-SI: "
        + ", ".join(f"{s} {base / r.stats['wall_seconds']:.2f}x" for s, r in results.items() if s != "nonsi")
    )
    print("identical output for every strategy (lossless): " + ("yes" if same else "NO"))
    return results, same


async def demo(address: str, args: argparse.Namespace) -> int:
    """``--demo``: the prompt greedily, then sampled at ``--temperature`` with
    ``--seed``, each under non-SI, SI and DSI (the same text every time: greedy
    and seeded sampling are both reproducible). ``--prompt``: one generation."""
    from dsi.tools.cli import stats_line
    from dsi.wire.client import Client, request

    synthetic = synthetic_target(args)
    prompt = args.prompt or ("" if synthetic else DEMO_PROMPT)
    ids = [int(t) for t in (args.prompt_ids or DEMO_PROMPT_IDS).split(",")] if synthetic and not prompt else []
    async with Client(address) as client:
        if not args.demo:
            r = await client.generate(request(prompt, ids, args.max_new_tokens, args.strategy))
            print(f"prompt: {prompt!r}" if prompt else f"prompt ids: {ids}")
            print(f"completion: {r.text!r}\n")
            print(f"{args.strategy:>6} {stats_line(r)}")
            return 0
        await warm_up(client, prompt, ids)
        print(f"== greedy (temperature 0), {args.max_new_tokens} new tokens:")
        _, greedy_same = await compare(client, prompt, ids, args, 0.0, None)
        sampled_same = True
        if args.temperature > 0:
            print(
                f"\n== sampled (temperature {args.temperature:g}, seed {args.seed}), {args.max_new_tokens} new tokens:"
            )
            _, sampled_same = await compare(client, prompt, ids, args, args.temperature, args.seed)
    return 0 if greedy_same and sampled_same else 1


async def main(args: argparse.Namespace) -> int:
    if args.targets is not None and args.targets < 1:
        raise InvalidArgument(f"--targets must be 1 or more, got {args.targets}")
    if args.threads < 0:
        raise InvalidArgument(f"--threads must be 0 or more, got {args.threads}")
    if args.demo_rounds < 1:
        raise InvalidArgument(f"--demo-rounds must be 1 or more, got {args.demo_rounds}")
    resolve_models(args)
    if args.targets is None:
        args.targets = default_targets(args)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="dsi-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - start-up, before any service runs
    cluster = Cluster(log_dir)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(
            f"starting {args.targets} target replica(s), a drafter and a coordinator (logs: {log_dir})", file=sys.stderr
        )
        starting = asyncio.ensure_future(start(args, cluster))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            return 130
        stopper.cancel()
        address = starting.result()
        if args.demo or args.prompt:
            return await demo(address, args)
        print(f"coordinator listening on {address}", file=sys.stderr)
        for line in served_urls(cluster.children[-1].log):
            print(line, file=sys.stderr)
        example = "--prompt-ids 1,2,3" if synthetic_target(args) else '"def fibonacci(n):"'
        print(f"try: dsi generate --coordinator {address} {example}\nCtrl-C stops everything.", file=sys.stderr)
        await stop.wait()
        return 0
    finally:
        print("stopping...", file=sys.stderr)
        await cluster.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
