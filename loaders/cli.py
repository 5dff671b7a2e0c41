"""``sparsedge convert``: the command-line face of ``sparsedge.convert``."""
from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Convert a PyTorch checkpoint (.pt/.pth/.bin/.safetensors, read without running pickled code)
or a Hugging Face model folder (config.json + weights) to a compressed .sparsedge model file,
with an accuracy report.

Graph: --arch package.module:factory (needs torch; the factory returns the nn.Module and the
checkpoint is loaded into it; captured with torch.export) or, without --arch, a template from
config.json: Hugging Face BERT encoders (BertModel; sentence-transformers folders add mean
pooling / L2 normalisation) and plain MLPs ({"model_type": "mlp"}).

Compression grammar (also usable per layer in a --recipe):
  --prune 0.9              unstructured magnitude pruning to 90% zeros, per layer
  --prune global:0.9       one magnitude threshold across all layers
  --prune block:4x1:0.9    zero 90% of the 4x1 blocks (r along outputs, c along inputs)
  --prune nm:2:4           keep the 2 largest of every 4 consecutive inputs
  --quant int8             int8 weights per output channel, activations quantized at run time
  --quant int8:static      + static activation scales from --calib data (min-max)
  --quant int8:static:p99.9  percentile calibration instead of min-max
  --lowrank rank:64        truncated SVD W ~ U V with rank 64 (only where it shrinks the layer)
  --lowrank energy:0.95    smallest rank keeping 95% of the squared singular values
  --format auto            per layer the fastest predicted format; dense when sparsity does not pay
  --format dense|csr|bsr:4x1|nm   force one storage format (int8 variants with --quant int8)
Zeros already in the checkpoint are always kept; torch.nn.utils.prune checkpoints
(weight_orig + weight_mask) are folded.

Recipe (TOML or JSON): defaults, per-layer overrides, skip list, e.g.
  prune = "0.9"
  quant = "int8"
  skip = ["embeddings.*"]
  [[layers]]
  match = "encoder.layer.*.intermediate.dense"
  prune = "block:4x1:0.8"

examples:
  sparsedge convert resnet.pt -o resnet.sparsedge --arch mypkg.models:resnet18 \\
      --shape x:batch,3,224,224 --prune 0.9 --quant int8 --report out/
  sparsedge convert ./bert-folder -o bert.sparsedge --prune block:4x1:0.8 --calib calib.npz
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="checkpoint file or Hugging Face model folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="model file to write (.sparsedge)")
    p.add_argument("--arch", metavar="MODULE:FACTORY",
                   help="torch model factory, e.g. sparsedge.bench.models:resnet_small (needs torch)")
    p.add_argument("--shape", action="append", metavar="NAME:D1,D2,...[:DTYPE]", default=None,
                   help="an input of forward(): dims are integers or symbols (kept symbolic), dtype "
                        "float32 (default), int64, int32, bool; repeat per input, e.g. "
                        "--shape input_ids:batch,seq:int64")
    p.add_argument("--prune", metavar="SPEC", help="0.9 | global:0.9 | block:RxC:0.9 | nm:N:M")
    p.add_argument("--quant", metavar="SPEC", help="int8 | int8:static | int8:static:pXX.X")
    p.add_argument("--lowrank", metavar="SPEC", help="rank:K | energy:0.95")
    p.add_argument("--format", dest="fmt", default="auto", metavar="FMT",
                   help="auto (default) | dense | csr | bsr:RxC | nm")
    p.add_argument("--recipe", metavar="FILE", help="TOML or JSON recipe (defaults, per-layer overrides, skip)")
    p.add_argument("--calib", metavar="FILE", help="calibration inputs: .npz (arrays named like the inputs) or .npy")
    p.add_argument("--report", metavar="DIR", help="write report.md, report.json and report.png here")
    p.add_argument("--key", metavar="KEY", help="where the state_dict sits in a training checkpoint "
                                                 "(e.g. model, state_dict; default: found if unambiguous)")
    p.add_argument("--trusted", action="store_true",
                   help="accept torch.export .pt2 archives: their loader calls torch.load and may run "
                        "arbitrary pickled code; only for files you trust")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")


def run(args) -> int:
    from .convert import convert

    res = convert(args.source, args.output, arch=args.arch, shapes=args.shape, state_dict_key=args.key,
                  prune=args.prune, quant=args.quant, lowrank=args.lowrank, fmt=args.fmt, recipe=args.recipe,
                  calib=args.calib, report_dir=args.report, trusted=args.trusted,
                  progress=not (args.no_progress or args.quiet))
    if not args.quiet:
        rep = res.report
        s = rep["size"]
        print(f"wrote {res.path}: {len(res.layers)} weight layers, {s['dense_fp32_bytes'] / 1e6:.2f} MB dense fp32 -> "
              f"{s['file_bytes'] / 1e6:.2f} MB file ({s['ratio']:.2f}x smaller)")
        kinds = {}
        for r in res.layers:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        print("formats: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
        e = rep["end_to_end"]
        for name, d in e["outputs"].items():
            t1 = f", top-1 agreement {100 * d['top1_agreement']:.1f}%" if "top1_agreement" in d else ""
            print(f"output {name}: max abs error {d['max_abs_err']:.3g}, cosine {d['cosine']:.6f}{t1} "
                  f"(vs {e['reference']}; inputs {rep['inputs']['origin']})")
        for n in rep.get("notes", []):
            print(f"note: {n}")
        if res.report_files:
            print("report: " + ", ".join(os.path.relpath(f) for f in res.report_files))
        sys.stdout.flush()
    return 0
