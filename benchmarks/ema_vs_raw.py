"""EMA vs raw weights at the end of the time-bounded tiny-Shakespeare run (issue 21, benchmark 2).

    python benchmarks/ema_vs_raw.py                      # the 10-minute recipe, --model.ema 0.995
    python benchmarks/ema_vs_raw.py --minutes 1          # a short trial
    python benchmarks/ema_vs_raw.py --ema 0.999 --extra 0.99,0.998

One run of ``nexttoken fit`` with the recipe of ``configs/shakespeare-10min.yaml`` (as
``time_to_quality.py``: last 10% of the bytes held out, ``--trainer.max_time``, no step limit) and
``--model.ema EMA``. Side by side from that one run, on the same held-out split and through the same
scoring (``nexttoken average``'s, i.e. ``nexttoken validate``'s: the module's validation step):
the raw weights of the last step, the product's EMA (what its report scores), and EMAs of other
decays kept beside it (``--extra``, each ``e = d e + (1 - d) w`` after every optimizer step from the
first, as Lightning's). Last lines: ``ema_vs_raw bits_per_byte: raw=... ema(D)=... ratio=...`` per
decay (ratio < 1: the average is better).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from time_to_quality import recipe_argv

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


class RawAndExtraAverages(L.Callback):
    """The raw weights when training ends (before the EMA is copied into the model), and an EMA of
    each ``decays`` kept after every optimizer step."""

    def __init__(self, decays: list[float]) -> None:
        self.decays = decays
        self.averages: dict[float, list[torch.Tensor]] = {}
        self.raw: dict[str, torch.Tensor] | None = None
        self._step = 0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self._step:
            return  # no optimizer step on this micro-batch
        self._step = trainer.global_step
        params = [p.detach() for p in pl_module.parameters()]
        for decay in self.decays:
            if decay not in self.averages:
                self.averages[decay] = [p.clone() for p in params]
            else:
                torch._foreach_lerp_(self.averages[decay], params, 1.0 - decay)

    def on_train_end(self, trainer, pl_module) -> None:
        self.raw = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def state_dict_of(self, pl_module, decay: float) -> dict[str, torch.Tensor]:
        """The module's state dict with the EMA of ``decay`` as its parameters. Through the module
        itself: a tied head and embedding are one parameter but two state-dict entries."""
        params = list(pl_module.parameters())
        held = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, self.averages[decay])
            state = {k: v.clone() for k, v in pl_module.state_dict().items()}
            torch._foreach_copy_(params, held)
        return state


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="wall time of training (default 10)")
    parser.add_argument("--ema", type=float, default=0.995, help="--model.ema of the run (default 0.995)")
    parser.add_argument(
        "--extra",
        default="0.995,0.99,0.999",
        help="decays averaged beside it, by hand (the run's own among them checks the product's EMA)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args()
    if not Path(args.data).is_file():
        sys.exit(f"no corpus at {args.data}")
    extra = [float(d) for d in args.extra.split(",") if d]
    seconds = int(round(args.minutes * 60))
    argv = recipe_argv(args.data, seconds, max(30, seconds // 10), args.set, "--model.ema", str(args.ema))
    from nexttoken.commands.average import validation_scores
    from nexttoken.commands.fit import run_lightning_cli
    from nexttoken.console import console

    keeper = RawAndExtraAverages(extra)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        argv += ["--trainer.default_root_dir", str(tmp / "runs")]
        print("nexttoken " + " ".join(argv), flush=True)
        started = time.perf_counter()
        import nexttoken.commands.fit as fit

        defaults = fit.trainer_defaults

        def with_keeper(verbose: bool = False) -> dict:
            settings = defaults(verbose)
            return {**settings, "callbacks": [*settings["callbacks"], keeper]}

        fit.trainer_defaults = with_keeper  # the keeper's on_train_end runs before the EMA's copy
        try:
            cli = run_lightning_cli(argv)
        finally:
            fit.trainer_defaults = defaults
        wall = time.perf_counter() - started
        run_dir = Path(cli.trainer.log_dir)
        report = json.loads((run_dir / "report.json").read_text())
        module, trainer = cli.model, cli.trainer
        # The product's EMA as the run ended (the model holds it now), the raw weights, the extra EMAs:
        # each a checkpoint of the run, scored alike.
        paths = {}
        trainer.save_checkpoint(tmp / "ema.ckpt")
        paths[f"ema({args.ema:g}) (the run's)"] = tmp / "ema.ckpt"
        template = torch.load(tmp / "ema.ckpt", weights_only=True)
        for name, state in [("raw", keeper.raw)] + [
            (f"ema({d:g}) (by hand)", keeper.state_dict_of(module, d)) for d in extra
        ]:
            checkpoint = {**template, "state_dict": state}
            checkpoint.pop("current_model_state", None)
            checkpoint.pop("averaging_state", None)
            path = tmp / f"{name.split()[0]}.ckpt"
            torch.save(checkpoint, path)
            paths[name] = path
        with console(verbose=False):  # the libraries' lines off, as in `nexttoken average`
            scores = validation_scores(list(paths.values()), precision=str(trainer.precision))
        scores = dict(zip(paths, scores))

    print(f"\nstep {trainer.global_step}, {wall:.0f} s in fit, load average {os.getloadavg()[0]:.2f}")
    print(f"the run's report (EMA {args.ema:g}): {report['validation']['bits_per_byte']:.4f} bits per byte")
    print("held-out bits per byte, the same run's weights side by side:")
    for name, score in scores.items():
        print(f"  {name:<24} {score['bits_per_byte']:.4f}   (loss {score['loss']:.4f})")
    raw = scores["raw"]["bits_per_byte"]
    for name, score in scores.items():
        if name != "raw":
            bpb = score["bits_per_byte"]
            print(
                f"ema_vs_raw bits_per_byte: raw={raw:.4f} {name.split()[0]}={bpb:.4f} ratio={bpb / raw:.4f}"
            )


if __name__ == "__main__":
    main()
