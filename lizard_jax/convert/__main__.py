import sys

from lizard_jax import cli
from lizard_jax.checkpoint import check_writable
from lizard_jax.convert import convert


@cli.command
def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m lizard_jax.convert",
                            description="Convert a HF folder or .gguf teacher to a lizard_jax checkpoint.")
    ap.add_argument("src", help="Hugging Face model folder or .gguf file")
    ap.add_argument("--out", required=True, help="output checkpoint folder")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="parameter dtype to store")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    a = ap.parse_args(argv)
    check_writable(a.out, a.overwrite)
    cfg = convert(a.src, a.out, dtype=a.dtype, overwrite=a.overwrite)
    print(f"wrote {a.out}: {cfg.architecture}, {cfg.num_layers} layers, d={cfg.d_model}, "
          f"{cfg.num_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
