"""Cross-layer transcoders (CLTs), as Gemma Scope 2 publishes them for Gemma 3 270M and 1B: read and run.

A CLT has one encoder per layer, reading that layer's MLP input (`mlp_in`), and each layer's latents
decode into the MLP outputs (`mlp_out`) of every layer:
    f_l   = ReLU(x_l · W_enc[l] + b_enc[l]) · 1[x_l · W_enc[l] + b_enc[l] > θ[l]]
    ŷ_m   = Σ_l f_l · W_dec[l][:, m, :] + b_dec[m]  (+ x_m · W_skip[m] for `_affine` CLTs)
Causality lives in the weights (a layer's latents have zero decoder rows for earlier layers), so in a
forward pass layer m's prediction uses the latents of layers ≤ m, which are all known by then.

Files (the layout public code reads from `google/gemma-scope-2-{270m,1b}-{pt,it}/clt/width_…_l0_…[_affine]/`;
not yet checked against the release itself from here, which has no Hub access): one
`params_layer_{l}.safetensors` per layer l = 0 … L−1 with w_enc [D, F_l], b_enc [F_l], threshold
[F_l], w_dec [F_l, L, D], b_dec [D], and affine_skip_connection [D, D] in `_affine` folders.
"""

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.errors import GspError
from pipeline.files import check_tensors, read_safetensors
from pipeline.hooks import register_at_module, site_module
from pipeline.sae import jumprelu_inference

LAYER_FILE = re.compile(r"params_layer_(\d+)\.safetensors")
LAYER_FILES = "params_layer_*.safetensors"  # every layer's file, as a glob (what a Hub fetch gets)
FIRST_LAYER_FILE = "params_layer_0.safetensors"  # the file that tells a CLT folder


def is_clt_folder(folder: Path) -> bool:
    return (folder / FIRST_LAYER_FILE).is_file()


class CrossLayerTranscoder(torch.nn.Module):
    """Per-layer encoders and cross-layer decoders; latents of layer l are columns offset[l]:offset[l+1]."""

    def __init__(self, params: list[dict[str, torch.Tensor]]):
        super().__init__()
        self.n_layers = len(params)
        self.layers = list(range(self.n_layers))  # the model's layers it reads and writes (a set's may be fewer)
        self.d_model = params[0]["w_enc"].shape[0]
        self.widths = [p["w_enc"].shape[1] for p in params]
        self.skip = "affine_skip_connection" in params[0]
        self.w_enc = torch.nn.ParameterList([p["w_enc"] for p in params])
        self.b_enc = torch.nn.ParameterList([p["b_enc"] for p in params])
        self.threshold = torch.nn.ParameterList([p["threshold"] for p in params])
        self.w_dec = torch.nn.ParameterList([p["w_dec"] for p in params])  # each (F_l, L, D)
        self.b_dec = torch.nn.ParameterList([p["b_dec"] for p in params])
        self.w_skip = torch.nn.ParameterList([p["affine_skip_connection"] for p in params]) if self.skip else None
        self.requires_grad_(False).eval()

    @property
    def width(self) -> int:
        return sum(self.widths)

    def encode_layer(self, layer: int, x_BD: torch.Tensor) -> torch.Tensor:
        pre = x_BD @ self.w_enc[layer] + self.b_enc[layer]
        return jumprelu_inference(pre, self.threshold[layer])

    def predict_layer(self, layer: int, f_by_layer: dict[int, torch.Tensor], x_BD: torch.Tensor) -> torch.Tensor:
        """ŷ of one layer's MLP output from the latents of the layers given (those ≤ it, in a forward pass)."""
        out = self.b_dec[layer].expand(len(x_BD), -1).clone()
        for l_in, f in f_by_layer.items():
            out += f @ self.w_dec[l_in][:, layer, :]
        return out + x_BD @ self.w_skip[layer] if self.skip else out

    # what circuit tracing reads (pipeline/attribution.py), as a transcoder set answers it too
    def encoder(self, layer: int) -> torch.Tensor:
        """(D, F_l): latent i of `layer` reads column i of its MLP input."""
        return self.w_enc[layer]

    def decoders(self, layer: int, idx: torch.Tensor) -> dict[int, torch.Tensor]:
        """What latents `idx` of `layer` write per unit activation: {layer m ≥ it: (n, D) into m's MLP output}."""
        return {m: self.w_dec[layer][idx, m] for m in self.layers if m >= layer}

    def skip_matrix(self, layer: int) -> torch.Tensor | None:
        """(D, D) of `layer`'s affine skip connection (x @ it), or None."""
        return self.w_skip[layer] if self.skip else None

    def decoder_bias(self, layer: int) -> torch.Tensor:
        """(D,) added to `layer`'s MLP output prediction."""
        return self.b_dec[layer]

    def encode_some(self, layer: int, x_BD: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The latents `idx` of `layer` only (JumpReLU needs no others)."""
        pre = x_BD @ self.w_enc[layer][:, idx] + self.b_enc[layer][idx]
        return jumprelu_inference(pre, self.threshold[layer][idx])

    def forward(self, x_LBD: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(predictions ŷ_m for every layer, latents f_l of every layer) from every layer's MLP input."""
        f = {layer: self.encode_layer(layer, x) for layer, x in enumerate(x_LBD)}
        return [self.predict_layer(m, f, x_LBD[m]) for m in self.layers], [f[i] for i in self.layers]

    @classmethod
    def load(cls, folder: Path) -> "CrossLayerTranscoder":
        """Every `params_layer_{l}.safetensors` of a folder, checked for shapes and values."""
        files = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := LAYER_FILE.fullmatch(p.name)))
        n = len(files)
        if [i for i, _ in files] != list(range(n)):
            raise GspError(f"{folder}: the CLT's layer files are not params_layer_0 … params_layer_{n - 1}")
        params = []
        for _, file in files:
            p = read_safetensors(file)
            w_enc = p.get("w_enc")
            if w_enc is None or w_enc.ndim != 2:
                raise GspError(f"{file} has no 2-D w_enc (keys: {', '.join(sorted(p))})")
            d, f = w_enc.shape
            shapes = {"w_enc": (d, f), "b_enc": (f,), "threshold": (f,), "w_dec": (f, n, d), "b_dec": (d,)}
            if "affine_skip_connection" in p or (params and "affine_skip_connection" in params[0]):
                shapes["affine_skip_connection"] = (d, d)
            check_tensors(p, shapes, file)
            if params and d != params[0]["w_enc"].shape[0]:
                raise GspError(f"{file}: d_model {d}, but layer 0's is {params[0]['w_enc'].shape[0]}")
            params.append({k: torch.nn.Parameter(p[k].contiguous(), requires_grad=False) for k in shapes})
        return cls(params)


@contextlib.contextmanager
def replace_mlps(model: torch.nn.Module, clt, special_BS1: torch.Tensor) -> Iterator[None]:
    """Every layer's MLP output replaced by the CLT's prediction, in one forward pass: layer l's MLP
    input is encoded when the pass reaches it, and layer m's output is predicted from the latents of
    layers ≤ m (positions where special_BS1 is True keep their own output). `clt` is a
    CrossLayerTranscoder or anything with its interface (a transcoder set: its layers only)."""
    inputs: dict[int, torch.Tensor] = {}
    latents: dict[int, torch.Tensor] = {}

    def read(layer: int):
        def fn(acts):
            x = acts.reshape(-1, acts.shape[-1]).float()
            inputs[layer], latents[layer] = x, clt.encode_layer(layer, x)

        return fn

    def write(layer: int):
        def fn(acts):
            seen = {i: f for i, f in latents.items() if i <= layer}
            y = clt.predict_layer(layer, seen, inputs[layer]).reshape(acts.shape)
            return torch.where(special_BS1, acts, y.to(acts.dtype))

        return fn

    handles = []
    try:
        for layer in clt.layers:
            handles.append(register_at_module(site_module(model, layer, "mlp_in"), "mlp_in", read(layer)))
            handles.append(register_at_module(site_module(model, layer, "mlp_out"), "mlp_out", write(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def zero_mlps(model: torch.nn.Module, layers: list[int], special_BS1: torch.Tensor) -> Iterator[None]:
    """The MLP outputs of `layers` zero-ablated (special-token positions keep theirs)."""

    def zero(acts):
        return torch.where(special_BS1, acts, torch.zeros_like(acts))

    handles = [register_at_module(site_module(model, layer, "mlp_out"), "mlp_out", zero) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
