"""Export small PyTorch models with both of PyTorch's ONNX exporters, as test fixtures.

    pip install torch==2.13.0 onnxscript   # a CPU build; the project itself needs no torch
    python models/export_fixtures.py        # writes tests/data/*.onnx

The tests then check block discovery and the whole pipeline on graphs exactly as
the TorchScript exporter (``dynamo=False``) and the dynamo exporter write them:
Shape/Gather arithmetic, fused or decomposed LayerNorm, BatchNorm, Gelu, SDPA.
Weights are seeded; the files are small and committed.
"""

from __future__ import annotations

import os

import torch
from torch import nn

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data")


class Attention(nn.Module):
    """timm-style attention: one qkv projection, scaled dot product, output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, class token, position embedding, pre-LN blocks, final LayerNorm."""

    def __init__(self, dim: int = 32, depth: int = 3, heads: int = 4, patch: int = 4, size: int = 16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, image):
        x = self.embed(image).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Basic(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(Basic(16, 16, 1), Basic(16, 32, 2), Basic(32, 32, 1))
        self.fc = nn.Linear(32, classes)

    def forward(self, image):
        return self.fc(self.layers(self.stem(image)).mean(dim=(2, 3)))


def _randomise_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)


def export(name: str, model: nn.Module, example: torch.Tensor) -> None:
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    for exporter, dynamo in (("torchscript", False), ("dynamo", True)):
        path = os.path.join(OUT, f"{name}_{exporter}.onnx")
        if dynamo:
            program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes={"image": {0: batch}},
                                        input_names=["image"], output_names=["output"], external_data=False)
            program.save(path, external_data=False)
        else:
            torch.onnx.export(model, (example,), path, dynamo=False, input_names=["image"], output_names=["output"],
                              dynamic_axes={"image": {0: "batch"}, "output": {0: "batch"}}, opset_version=17)
        print("wrote", os.path.relpath(path), os.path.getsize(path), "bytes")


def main() -> None:
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    export("tiny_vit", TinyViT(), torch.randn(2, 3, 16, 16))
    resnet = TinyResNet()
    _randomise_batchnorm(resnet)
    export("tiny_resnet", resnet, torch.randn(2, 3, 16, 16))


if __name__ == "__main__":
    with torch.no_grad():
        main()
