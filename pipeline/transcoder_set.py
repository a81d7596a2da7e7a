"""Transcoder sets: one transcoder per layer, the unit that circuit tracing replaces the MLPs with.

A set is one folder: a subfolder per layer holding that layer's transcoder in Gemma Scope 2's
transcoder layout (params.safetensors + config.json, as `gsp fit` writes any transcoder), and an
index, `transcoder_set.json`:

    {"format": "gsp transcoder set", "version": 1,
     "model": "<the store's model>", "model_revision": "<its revision or null>",
     "input_site": "mlp_in", "output_site": "mlp_out",
     "layers": {"0": {"folder": "layer_0", "hook_point_in": "...", "hook_point_out": "..."}, ...}}

`gsp fit --store STORE --transcoders mlp_in:mlp_out --layers all` fits every layer's from one read
of the store (stages/fit.py: a sweep whose members read different hook points) and writes the index
once all of them are saved, so a set with an index is whole.
"""

import dataclasses
import json
import re
from pathlib import Path

import torch

from pipeline.errors import GspError
from pipeline.files import atomic_write_text, read_json
from pipeline.sae import jumprelu_inference
from pipeline.store.location import open_group
from pipeline.store.meta import StoreMeta

INDEX = "transcoder_set.json"
FORMAT = "gsp transcoder set"


def member_name(layer: int) -> str:
    return f"layer_{layer}"


def layers_of(root: str, site_in: str, site_out: str, spec: str) -> list[int]:
    """The layers `spec` names (`all`: every layer of the store holding both sites; or `3,6,9`), each
    checked to hold both sites."""
    try:
        meta = StoreMeta.from_attrs(dict(open_group(root, "r").attrs), root)
    except GspError as e:
        raise GspError(f"--transcoders needs a store of several hook points as --store: {e}") from None
    sites: dict[int, set[str]] = {}
    for h in meta.hooks:
        sites.setdefault(h.layer, set()).add(h.site)
    both = sorted(layer for layer, s in sites.items() if {site_in, site_out} <= s)
    if spec.strip() == "all":
        if not both:
            held = ", ".join(sorted({h.site for h in meta.hooks}))
            raise GspError(f"store {root} has no layer holding both {site_in} and {site_out} (its sites: {held}); "
                           f"harvest them with --layer all --site {site_in},{site_out}")  # fmt: skip
        return both
    try:
        layers = [int(v) for v in spec.split(",")]
    except ValueError:
        raise GspError(f"--layers takes all or layer numbers like 3,6,9; got {spec!r}") from None
    missing = [layer for layer in layers if layer not in both]
    if missing or len(set(layers)) < len(layers):
        why = f"layer {missing[0]} is not one of them" if missing else "a layer is listed twice"
        raise GspError(f"--layers {spec}: store {root} holds both {site_in} and {site_out} at layers "
                       f"{_spans(both) or 'none'}; {why}")  # fmt: skip
    return sorted(layers)


def check_index_free(folder: Path) -> Path:
    """The index's path in `folder`; an error if a file there is not a set's index (gsp never replaces it)."""
    file = Path(folder) / INDEX
    if file.exists():
        try:
            ours = json.loads(file.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise GspError(f"{file} exists and is not a transcoder set's index; choose another --out")
    return file


def write_index(folder: Path, inputs: list, targets: list) -> Path:
    """The set's index, from each layer's input and target hook points (opened stores), in `folder`
    beside the layer folders; an index already there is replaced only if it is a set's index."""
    file = check_index_free(folder)
    meta = inputs[0].meta
    index = {
        "format": FORMAT,
        "version": 1,
        "model": meta.model.name,
        "model_revision": meta.model.revision,
        "input_site": inputs[0].hook.site,
        "output_site": targets[0].hook.site,
        "layers": {
            str(x.hook.layer): {
                "folder": member_name(x.hook.layer),
                "hook_point_in": x.hook.hook_point,
                "hook_point_out": y.hook.hook_point,
            }  # fmt: skip
            for x, y in zip(inputs, targets, strict=True)
        },
    }
    atomic_write_text(file, json.dumps(index, indent=2) + "\n")
    return file


def read_index(folder: Path, check_files: bool = True) -> dict[int, Path]:
    """A gsp set's layers and their transcoder folders, each checked to be there (unless not `check_files`:
    the index of a set on the Hub, read before its members are fetched)."""
    file = Path(folder) / INDEX
    if not file.is_file():
        raise GspError(f"{folder} is not a transcoder set (no {INDEX}); fit one with gsp fit --transcoders "
                       "mlp_in:mlp_out, or finish an interrupted one with --resume")  # fmt: skip
    index = read_json(file)
    if index.get("format") != FORMAT or not isinstance(index.get("layers"), dict):
        raise GspError(f"{file} is not a transcoder set's index (format {index.get('format')!r})")
    out = {}
    for layer, entry in index["layers"].items():
        member = Path(folder) / str(entry.get("folder", ""))
        if check_files and not (member / "params.safetensors").is_file():
            raise GspError(f"{file} names {member} for layer {layer}, which holds no transcoder")
        out[int(layer)] = member
    return dict(sorted(out.items()))


def _spans(layers: list[int]) -> str:
    """3, 4, 5, 9 as 3–5, 9."""
    spans, start = [], None
    for i, v in enumerate(layers):
        start = v if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != v + 1:
            spans.append(f"{start}–{v}" if v > start else str(v))
            start = None
    return ", ".join(spans)


def is_set_folder(folder: Path) -> bool:
    return (Path(folder) / INDEX).is_file()


class TranscoderSet(torch.nn.Module):
    """A set's transcoders run as one, with pipeline.clt.CrossLayerTranscoder's interface (`layers`,
    `encode_layer`, `predict_layer`, `forward`, and what tracing reads: `encoder`, `decoders`,
    `skip_matrix`, `decoder_bias`, `encode_some`), so that gsp evaluate and gsp trace take a set as
    they take a CLT: each layer's latents decode into its own layer only.

    `streamed`: the set holds one layer's transcoder at a time, read from its folder when a layer is
    asked for (on the device the set was moved to), for work that goes through the layers once or
    layer by layer (tracing: a set of wide transcoders need not fit in memory at once). `members` then
    keep what the files say (model, stores) without the weights."""

    def __init__(self, members: dict[int, "LoadedSAE"], streamed: bool = False):  # noqa: F821  (sae_formats)
        super().__init__()
        self._held: tuple[int, torch.nn.Module] | None = None  # a streamed set's one layer in memory: (layer, SAE)
        self.layers = list(members)
        self.n_layers = len(self.layers)
        self.d_model = next(iter(members.values())).sae.d_in
        self.widths = [m.sae.width for m in members.values()]
        self.skip = any(m.sae.skip for m in members.values())
        self.streamed = streamed
        if streamed:
            self.members = {layer: dataclasses.replace(m, sae=None) for layer, m in members.items()}
            self.register_buffer("_device", torch.zeros(0), persistent=False)  # where .to() sends the set
        else:
            self.members = members
            self.saes = torch.nn.ModuleDict({str(layer): m.sae for layer, m in members.items()})
        self.requires_grad_(False).eval()

    def sae(self, layer: int) -> torch.nn.Module:
        """`layer`'s transcoder (pipeline.sae.SAE)."""
        if not self.streamed:
            return self.saes[str(layer)]
        if self._held is None or self._held[0] != layer:
            from pipeline.sae_formats import load_sae

            self._held = None  # (the last one freed before the next is read)
            sae = load_sae(str(self.members[layer].path)).sae.to(self._device.device)
            self._held = (layer, sae.requires_grad_(False).eval())
        return self._held[1]

    def _apply(self, fn, recurse=True):  # .to() and the like: a streamed set reads its next layer there
        self._held = None
        return super()._apply(fn, recurse)

    @property
    def width(self) -> int:
        return sum(self.widths)

    def encode_layer(self, layer: int, x_BD: torch.Tensor) -> torch.Tensor:
        return self.sae(layer).encode(x_BD)[0]

    def predict_layer(self, layer: int, f_by_layer: dict[int, torch.Tensor], x_BD: torch.Tensor) -> torch.Tensor:
        return self.sae(layer).decode(f_by_layer[layer], x_BD)

    def encoder(self, layer: int) -> torch.Tensor:
        return self.sae(layer).w_enc

    def decoders(self, layer: int, idx: torch.Tensor) -> dict[int, torch.Tensor]:
        return {layer: self.sae(layer).w_dec[idx]}

    def skip_matrix(self, layer: int) -> torch.Tensor | None:
        sae = self.sae(layer)
        return sae.w_skip if sae.skip else None

    def decoder_bias(self, layer: int) -> torch.Tensor:
        return self.sae(layer).b_dec

    def encode_some(self, layer: int, x_BD: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The latents `idx` of `layer`: JumpReLU's from their own columns; TopK's need every latent."""
        sae = self.sae(layer)
        if sae.arch == "topk":
            return sae.encode(x_BD)[0][:, idx]
        return jumprelu_inference(x_BD @ sae.w_enc[:, idx] + sae.b_enc[idx], sae.threshold[idx])

    def forward(self, x_LBD: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        f = {layer: self.encode_layer(layer, x) for layer, x in zip(self.layers, x_LBD, strict=True)}
        return [self.predict_layer(m, f, x) for m, x in zip(self.layers, x_LBD, strict=True)], list(f.values())

    @classmethod
    def load(cls, folder: Path, streamed: bool = False) -> "TranscoderSet":
        """Every layer of a set's index, each checked to be a transcoder of that layer's MLP."""
        return cls.of(read_index(folder), str(folder), streamed)

    @classmethod
    def of(cls, folders: dict[int, Path], what: str, streamed: bool = False) -> "TranscoderSet":
        """The transcoders in `folders` (layer -> a transcoder folder gsp reads), each checked to read that
        layer's MLP input and predict its output, all of one width (a streamed set reads each once here
        to check it, and holds none)."""
        from pipeline.sae_formats import load_sae

        members = {}
        for layer, member in sorted(folders.items()):
            loaded = load_sae(str(member))
            if not loaded.is_transcoder or (loaded.layer, loaded.layer_out) != (layer, layer):
                raise GspError(f"{member} is not a transcoder of layer {layer}'s MLP (it reads layer {loaded.layer} "
                               f"{loaded.site}, predicts layer {loaded.layer_out} {loaded.site_out})")  # fmt: skip
            if streamed:  # what the checks below read; the weights are freed now, not at the end
                sae = loaded.sae
                loaded.sae = _Shape(sae.d_in, sae.d_out, sae.width, sae.skip)
            members[layer] = loaded
        widths = {(m.sae.d_in, m.sae.d_out) for m in members.values()}
        if len(widths) > 1 or len(set(next(iter(widths)))) > 1:
            raise GspError(f"the transcoders of {what} differ in width (d_in, d_out): {sorted(widths)}")
        return cls(members, streamed)


@dataclasses.dataclass
class _Shape:
    """What a streamed set keeps of a transcoder while it checks the set: its shape, not its weights."""

    d_in: int
    d_out: int
    width: int
    skip: bool


GEMMA_SCOPE_2_MEMBER = re.compile(r"layer_(\d+)_(width_\w+)")  # layer_12_width_16k_l0_small[_affine]


def load_transcoders(spec: str | Path, variant: str | None = None, streamed: bool = False, *,
                     revision: str | None = None, token: str | None = None):  # fmt: skip
    """What circuit tracing replaces the MLPs with, from a local folder or a Hub path owner/repo/sub/folder
    (`fetch_transcoders`): a gsp transcoder set; a Gemma Scope 2 cross-layer transcoder (pipeline/clt.py);
    or a folder of Gemma Scope 2 per-layer transcoders (its `transcoder_all/`, subfolders
    layer_<L>_width_<W>_l0_<X>[_affine]), `variant` naming which (`width_16k_l0_small_affine`) when it
    holds several. `streamed`: a set of per-layer transcoders that holds one layer at a time
    (`TranscoderSet`); a CLT is held whole."""
    from pipeline.clt import CrossLayerTranscoder, is_clt_folder
    from pipeline.sae_formats import hub_sae_path

    folder = Path(spec).expanduser()
    if not folder.exists() and (hub := hub_sae_path(str(spec))):
        folder = fetch_transcoders(*hub, variant, revision=revision, token=token)
    elif not folder.is_dir():
        raise GspError(f"{spec} is not a folder: give a transcoder set (gsp fit --transcoders) or a Hub path "
                       "owner/repo/sub/folder")  # fmt: skip
    if is_set_folder(folder):
        return TranscoderSet.load(folder, streamed)
    if is_clt_folder(folder):
        return CrossLayerTranscoder.load(folder)
    variants: dict[str, dict[int, Path]] = {}
    for sub in sorted(folder.iterdir()) if folder.is_dir() else []:  # (a Hub path may fetch nothing)
        m = GEMMA_SCOPE_2_MEMBER.fullmatch(sub.name)
        if m and (sub / "params.safetensors").is_file():
            variants.setdefault(m.group(2), {})[int(m.group(1))] = sub
    if not variants:
        raise GspError(f"{folder} is not a transcoder set (no {INDEX}), a cross-layer transcoder (no "
                       "params_layer_0.safetensors) or a folder of Gemma Scope 2 transcoders (layer_<L>_width_"
                       "<W>_l0_<X>/): fit a set with gsp fit --transcoders mlp_in:mlp_out")  # fmt: skip
    if variant is None and len(variants) > 1:
        raise GspError(f"{folder} holds several transcoder variants ({', '.join(sorted(variants))}): choose one "
                       "with --variant")  # fmt: skip
    variant = variant or next(iter(variants))
    if variant not in variants:
        raise GspError(f"{folder} has no variant {variant}; it holds {', '.join(sorted(variants))}")
    return TranscoderSet.of(variants[variant], f"{folder} ({variant})", streamed)


def fetch_transcoders(repo_id: str, sub: str, variant: str | None = None, *, revision: str | None = None,
                      token: str | None = None) -> Path:  # fmt: skip
    """A Hub folder of transcoders fetched into the Hub cache (or found there, offline), only what
    `load_transcoders` reads of it: a gsp set's index and members, a CLT's layer files, or one variant of
    a folder of Gemma Scope 2 per-layer transcoders (every variant of every layer is a lot to download).
    Without `variant`, the folder's small files are fetched first to tell which of them it is."""
    import huggingface_hub

    from pipeline import clt
    from pipeline.models import hf_token, hub_errors
    from pipeline.sae_formats import SAE_FILES

    def fetch(patterns: list[str]) -> Path:
        with hub_errors(repo_id, sub, revision, token):
            root = huggingface_hub.snapshot_download(repo_id, revision=revision, token=hf_token(token),
                                                     allow_patterns=patterns)  # fmt: skip
        return Path(root) / sub

    if variant is None:
        folder = fetch([f"{sub}/{INDEX}", f"{sub}/*/config.json"])
        if is_set_folder(folder):
            members = [m.relative_to(folder).as_posix() for m in read_index(folder, check_files=False).values()]
            return fetch([f"{sub}/{INDEX}", *(f"{sub}/{m}/{name}" for m in members for name in SAE_FILES)])
        names = [c.parent.name for c in folder.glob("*/config.json")]
        found = {m.group(2) for name in names if (m := GEMMA_SCOPE_2_MEMBER.fullmatch(name))}
        if len(found) > 1:
            raise GspError(f"{repo_id}/{sub} holds several transcoder variants ({', '.join(sorted(found))}): choose "
                           "one with --variant")  # fmt: skip
        if not found:  # a cross-layer transcoder, or nothing gsp reads (load_transcoders says which)
            return fetch([f"{sub}/{clt.LAYER_FILES}", f"{sub}/config.json"])
        variant = found.pop()
    folder = fetch([f"{sub}/layer_*_{variant}/{name}" for name in SAE_FILES])
    if not any(folder.glob(f"layer_*_{variant}/params.safetensors")):
        raise GspError(f"{repo_id}/{sub} has no Gemma Scope 2 transcoders of variant {variant} "
                       "(layer_<L>_{variant}/params.safetensors)")  # fmt: skip
    return folder
