"""`python -m blockpress.workers.tinytrain --seed 0 --out workers/checkpoints/tiny-calculator`."""

from __future__ import annotations

import argparse
from pathlib import Path

from blockpress.workers.tinytrain.train import TrainSettings, train


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the tiny DiffusionGemma calculator checkpoint.")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--noisings", type=int, default=TrainSettings.noisings)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--threads", type=int, default=TrainSettings.threads)
    parser.add_argument("--init-from", type=Path, default=None, help="continue from this checkpoint")
    parser.add_argument("--hidden-size", type=int, default=TrainSettings.hidden_size)
    parser.add_argument("--layers", type=int, default=TrainSettings.layers)
    parser.add_argument("--heads", type=int, default=TrainSettings.heads)
    parser.add_argument("--kv-heads", type=int, default=TrainSettings.kv_heads)
    parser.add_argument("--two-step-rate", type=float, default=TrainSettings.two_step_rate)
    parser.add_argument("--digit-confusion", type=float, default=TrainSettings.digit_confusion)
    parser.add_argument("--own-digits", type=float, default=TrainSettings.own_digits)
    parser.add_argument("--save-every", type=int, default=0, help="also save into OUT/partial every N steps")
    args = parser.parse_args()
    # Every option but --out is named after the TrainSettings field it sets.
    options = vars(args)
    out = options.pop("out")
    settings = TrainSettings(**options)
    log = train(out, settings)
    print(f"trained in {log['wall_s']} s, final loss {log['final_loss_mean_50']:.4f}; wrote {out}")


if __name__ == "__main__":
    main()
