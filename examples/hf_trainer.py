"""dion_lp.Dion in a Hugging Face ``Trainer``: pass the optimizer in.

``Trainer(..., optimizers=(optimizer, scheduler))`` takes any torch optimizer, so
Dion needs no integration code: build the param groups from the model, build
Dion, hand both to the Trainer. The model here is a small GPT-2 built from a
config (no download) trained on bytes of the Python standard library's source.

    python -m pip install -e ".[examples]"
    python examples/hf_trainer.py --steps 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `benchmarks` from a checkout

import dion_lp  # noqa: E402
from benchmarks.data import load_corpus  # noqa: E402


class ByteWindows(torch.utils.data.Dataset):
    """Fixed windows of a byte corpus as causal-LM examples (labels = inputs)."""

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        self.data, self.seq_len = data, seq_len

    def __len__(self) -> int:
        return (self.data.numel() - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[i * self.seq_len : (i + 1) * self.seq_len].long()
        return {"input_ids": ids, "labels": ids.clone()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train for ``--steps`` steps; returns the first and last logged training loss."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=args.seq_len, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)
    # GPT-2's attention/MLP weights are Conv1D (2-D, stored transposed): Dion takes
    # them as matrices; wte/wpe and the tied lm_head go to Lion.
    groups = dion_lp.param_groups(model, scalar_algorithm="lion", scalar_lr=1e-3)
    optimizer = dion_lp.Dion(groups, lr=0.02, momentum_dtype="int8")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    corpus = load_corpus(train_bytes=200_000, val_bytes=10_000)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=out,
                max_steps=args.steps,
                per_device_train_batch_size=args.batch_size,
                logging_steps=1,
                report_to=[],
                save_strategy="no",
                use_cpu=True,
            ),
            train_dataset=ByteWindows(corpus.tokens["train"], args.seq_len),
            optimizers=(optimizer, scheduler),
        )
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    result = {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "state_bytes": optimizer.state_bytes(),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
