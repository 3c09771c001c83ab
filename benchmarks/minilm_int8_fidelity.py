"""Fidelity of the int8 MiniLM copy (bonsai.text.minilm.export_int8) against the float32 encoder.

    python benchmarks/minilm_int8_fidelity.py --data data/emoji [--variants 4000]

Encodes every dataset caption and a fixed sample of the training caption variants with both
encoders and prints cosine similarities of the token states (real tokens) and of the sentence
embeddings, plus the file size."""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

from bonsai.text.minilm import INT8_FILE, TextEncoder, export_int8
from bonsai.train.captions import variant_table


@torch.no_grad()
def _states(enc: TextEncoder, prompts: list[str], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-token states float32 [sum tokens, 384] and sentence embeddings [P, 384]; batches
    padded to their longest prompt (masked tokens do not change the real ones)."""
    tokens, sentences = [], []
    for i in range(0, len(prompts), batch):
        b = enc.tokenizer(prompts[i : i + batch], padding=True, truncation=True, max_length=enc.max_tokens, return_tensors="pt")
        s = enc.model(**b).last_hidden_state.float()
        m = b["attention_mask"].bool()
        tokens.append(s[m])
        pooled = (s * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        sentences.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(tokens), torch.cat(sentences)


def _summary(cos: torch.Tensor) -> dict[str, float]:
    return {"mean": round(float(cos.mean()), 5), "p01": round(float(cos.quantile(0.001)), 5), "min": round(float(cos.min()), 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/emoji"))
    parser.add_argument("--variants", type=int, default=4000, help="caption variants sampled (fixed seed)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    records = json.loads((args.data / "captions.json").read_text())
    prompts, _, _ = variant_table(records)
    sets = {"captions": sorted({r["caption"] for r in records}), "variants": random.Random(0).sample(prompts, min(args.variants, len(prompts)))}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = export_int8(tmp)
        ref, q = TextEncoder(), TextEncoder(tmp)
        report = {"int8_file_bytes": sizes[INT8_FILE], "folder_bytes": sum(sizes.values())}
        for name, ps in sets.items():
            (ta, ea), (tb, eb) = _states(ref, ps), _states(q, ps)
            report[name] = {
                "prompts": len(ps),
                "token_cos": _summary(torch.nn.functional.cosine_similarity(ta, tb, dim=-1)),
                "token_rel_err": round(float((ta - tb).norm() / ta.norm()), 5),
                "sentence_cos": _summary((ea * eb).sum(-1)),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
