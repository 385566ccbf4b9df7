"""Train the digits classifier / FD-digits feature network and write it into the package.

    python scripts/train_digits_classifier.py            # ~1 minute on 2 CPU cores

Trains on the 1,438 training digits (fixed split, :mod:`diffsamplers.data.digits`) with light augmentation
(±1-pixel shifts, small Gaussian noise, so that generated samples are in-distribution), reports accuracy on
the 359 held-out digits and writes ``diffsamplers/assets/digits_classifier/``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from diffsamplers.data.digits import load_digits_dataset
from diffsamplers.models.digits import DIGITS_CLASSIFIER_DIR, save_digits_classifier
from diffsamplers.models.digits_classifier import DigitsClassifier


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    shifts = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3))
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(DIGITS_CLASSIFIER_DIR))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_digits_dataset("train")
    x_test, y_test = load_digits_dataset("test")
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(augment(x_train[idx], g)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(
            f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  held-out accuracy {acc:.4f}  ({time.time() - start:.0f} s)"
        )
    save_digits_classifier(model, args.output, {"held_out_accuracy": acc, "epochs": args.epochs, "seed": args.seed})
    print(f"wrote {args.output} (held-out accuracy {acc:.4f})")


if __name__ == "__main__":
    main()
