"""A tiny BERT sequence classifier trained with the Hugging Face ``Trainer`` (configuration built locally,
nothing downloaded). Labels are whether token 5 occurs in the sequence.

``--watch DIR`` is the same program instrumented by hand: ``mon.step(loss)`` right after the Trainer's
backward (its ``training_step``), before it clips the gradients.
"""

import argparse

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--out", default="hf-trainer-out")
parser.add_argument("--watch", default=None, help="instrument by hand with gg.watch, logging to this folder")
args = parser.parse_args()
torch.manual_seed(0)
torch.set_num_threads(1)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 30, (n, 12), generator=g)
        self.labels = (self.ids == 5).any(1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=16, num_labels=2)
model = BertForSequenceClassification(config)
training = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=10, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
mon = None
if args.watch:
    import gradguard as gg

    mon = gg.watch(model, log_dir=args.watch, console=False)


class Watched(Trainer):
    def training_step(self, *a, **kw):
        loss = super().training_step(*a, **kw)
        if mon is not None:
            mon.step(loss)
        return loss


trainer = Watched(model=model, args=training, train_dataset=Tokens(256))
result = trainer.train()
if mon is not None:
    mon.close()
print(f"final loss {result.training_loss:.6f}")
