"""Where to read a model: decoder layers, probe sites, and a hook that captures them at chosen positions.

A site is one of `SITES`; its full name is `blocks.{layer}.{site}` (TransformerLens style). Everything is
resolved from the module structure, never from a table of model names:

- layers: the `nn.ModuleList` whose length is the text config's layer count and whose blocks hold an attention
  child and an MLP child;
- attention: a block child whose name contains "attn" or "attention" and that holds Linear layers (this skips
  `post_attention_layernorm` and `resid_attn_dropout`);
- MLP: a block child named in `_MLP_NAMES`, else the one other child whose Linear layers read and write the
  hidden size;
- down projection: the last Linear-like *direct* child of the MLP whose output size is the hidden size. Direct
  only, so a mixture-of-experts block (fused experts plus a shared expert) is refused rather than silently
  read at its shared expert.

"Linear-like" means `nn.Linear` or GPT-2's `Conv1D` (which stores its weight transposed, `[in, out]`, and its
output size in `nf`).

Sites read the module's own output, before any norm the block applies afterwards: in Gemma 2/3 the `attn` and
`mlp` outputs pass through `post_attention_layernorm` / `post_feedforward_layernorm` before they are added to
the residual stream. `resid` is the raw block output; `output_hidden_states` gives the same for every layer but
the last, whose entry is taken after the final norm.

torch is imported inside functions so that `truthmap --help` stays light.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from truthmap.errors import ConfigError, ModelError, check_name

if TYPE_CHECKING:
    import torch

SITES = ("mlp", "mlp_in", "attn", "resid")

# Child names that hold a block's MLP across Llama, Mistral, Qwen, Gemma, Phi, GPT-2/NeoX/J (mlp), InternLM
# (feed_forward) and others (ffn, ff).
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")


# --- config -------------------------------------------------------------------------------------------------


def _text_config(model: "torch.nn.Module"):
    """The text (decoder) config, or None for a module without one."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            return get_text(decoder=True)
        except TypeError:  # older signature without the keyword
            return get_text()
    return config


def _config_int(model: "torch.nn.Module", keys: tuple[str, ...]) -> int | None:
    config = _text_config(model)
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _hidden_size(model: "torch.nn.Module") -> int:
    hidden = _config_int(model, _HIDDEN_KEYS)
    if hidden is not None:
        return hidden
    # No config (a bare module): the embedding width is the residual width.
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is not None and hasattr(emb, "embedding_dim"):
        return int(emb.embedding_dim)
    raise ModelError(
        f"Cannot find the hidden size of {type(model).__name__}: looked for config."
        f"{'/'.join(_HIDDEN_KEYS)} and an input embedding"
    )


# --- structure ----------------------------------------------------------------------------------------------


def _linear_shape(module: "torch.nn.Module") -> tuple[int, int] | None:
    """(in, out) of an nn.Linear or GPT-2 Conv1D, else None."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    # Conv1D: weight is [in, out] and nf is out; checking both keeps other modules with an `nf` out.
    if isinstance(getattr(module, "nf", None), int) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        if weight.shape[1] == module.nf:
            return int(weight.shape[0]), int(weight.shape[1])
    return None


def _linears(module: "torch.nn.Module") -> list[tuple[int, int]]:
    return [s for m in module.modules() if (s := _linear_shape(m)) is not None]


def _attention_child(block: "torch.nn.Module") -> tuple[str, "torch.nn.Module"] | None:
    found = [
        (name, child)
        for name, child in block.named_children()
        if ("attn" in name.lower() or "attention" in name.lower()) and _linears(child)
    ]
    # Several (e.g. self- and cross-attention) would be ambiguous; a causal LM block has one.
    return found[0] if len(found) == 1 else None


def _mlp_child(block: "torch.nn.Module", hidden: int) -> tuple[str, "torch.nn.Module"] | None:
    children = dict(block.named_children())
    for name in _MLP_NAMES:
        if name in children:
            return name, children[name]
    attn = _attention_child(block)
    attn_name = attn[0] if attn else None
    # Structural fallback: the one non-attention child whose Linear layers read the hidden size first and
    # write it last (an up-then-down projection). A lone Linear is a projection, not an MLP.
    found = []
    for name, child in children.items():
        shapes = _linears(child)
        if name != attn_name and len(shapes) >= 2 and shapes[0][0] == hidden and shapes[-1][1] == hidden:
            found.append((name, child))
    return found[0] if len(found) == 1 else None


def _looks_like_block(block: "torch.nn.Module", hidden: int) -> bool:
    return _attention_child(block) is not None and _mlp_child(block, hidden) is not None


def decoder_layers(model: "torch.nn.Module") -> list["torch.nn.Module"]:
    """The decoder blocks, in order. Works on a base model or a *ForCausalLM wrapper."""
    import torch

    name = type(model).__name__
    n_layers = _config_int(model, _LAYER_KEYS)
    lists = [(path, m) for path, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if n_layers is not None:
        lists = [(path, m) for path, m in lists if len(m) == n_layers]
    if len(lists) > 1:
        # Several lists of that length (e.g. a vision tower): keep those made of attention + MLP blocks.
        hidden = _hidden_size(model)
        lists = [(path, m) for path, m in lists if all(_looks_like_block(b, hidden) for b in m)]
    if len(lists) > 1:
        # Still several: a multimodal wrapper names its text decoder; prefer lists inside it.
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        if isinstance(decoder, torch.nn.Module) and decoder is not model:
            inside = {id(m) for m in decoder.modules()}
            lists = [(path, m) for path, m in lists if id(m) in inside]
    if n_layers is None and len(lists) > 1:
        hidden = _hidden_size(model)
        lists = [(path, m) for path, m in lists if all(_looks_like_block(b, hidden) for b in m)]
    wanted = f"{n_layers} blocks" if n_layers is not None else "blocks"
    if not lists:
        raise ModelError(f"Cannot find the decoder layers of {name}: looked for an nn.ModuleList of {wanted}")
    if len(lists) > 1:
        paths = ", ".join(path for path, _ in lists)
        raise ModelError(f"Cannot tell the decoder layers of {name}: several nn.ModuleLists of {wanted}: {paths}")
    return list(lists[0][1])


def num_layers(model: "torch.nn.Module") -> int:
    return len(decoder_layers(model))


def _check_site(site: str) -> None:
    check_name("site", site, SITES)


def _find_mlp(model: "torch.nn.Module", i: int, block: "torch.nn.Module", hidden: int) -> "torch.nn.Module":
    found = _mlp_child(block, hidden)
    if found is None:
        raise ModelError(
            f"Cannot find the MLP of layer {i} in {type(model).__name__}: looked for a child named "
            f"{', '.join(_MLP_NAMES)}, or one child whose Linear layers read and write the hidden size {hidden}"
        )
    return found[1]


def _find_down_proj(model: "torch.nn.Module", i: int, mlp: "torch.nn.Module", hidden: int):
    """(module, in_features) of the MLP's down projection."""
    found = [(c, s) for c in mlp.children() if (s := _linear_shape(c)) is not None and s[1] == hidden]
    if not found:
        raise ModelError(
            f"Cannot find the down projection of layer {i} in {type(model).__name__}: looked for a Linear or "
            f"Conv1D child of {type(mlp).__name__} with output size {hidden}"
        )
    module, (n_in, _) = found[-1]
    return module, n_in


def _find_attention(model: "torch.nn.Module", i: int, block: "torch.nn.Module") -> "torch.nn.Module":
    found = _attention_child(block)
    if found is None:
        raise ModelError(
            f"Cannot find the attention of layer {i} in {type(model).__name__}: looked for one child whose name "
            "contains attn or attention and that holds Linear layers"
        )
    return found[1]


def site_hooks(model: "torch.nn.Module", site: str) -> list[tuple["torch.nn.Module", str]]:
    """Per layer, the module to hook for `site` and the hook kind: "forward" or "forward_pre"."""
    _check_site(site)
    layers = decoder_layers(model)
    if site == "resid":
        return [(block, "forward") for block in layers]
    hidden = _hidden_size(model)
    hooks = []
    for i, block in enumerate(layers):
        if site == "attn":
            hooks.append((_find_attention(model, i, block), "forward"))
            continue
        mlp = _find_mlp(model, i, block, hidden)
        if site == "mlp":
            hooks.append((mlp, "forward"))
        else:  # mlp_in: what enters the down projection, after the activation (and gating)
            hooks.append((_find_down_proj(model, i, mlp, hidden)[0], "forward_pre"))
    return hooks


def site_width(model: "torch.nn.Module", site: str) -> int:
    """Width of one captured vector: the hidden size, or the MLP's intermediate size for mlp_in."""
    _check_site(site)
    hidden = _hidden_size(model)
    if site != "mlp_in":
        return hidden
    # Read off the down projection itself: configs disagree (GPT-2's n_inner may be None, Phi-3 fuses gate+up).
    widths = {
        _find_down_proj(model, i, _find_mlp(model, i, block, hidden), hidden)[1]
        for i, block in enumerate(decoder_layers(model))
    }
    if len(widths) > 1:  # a store needs one width; per-layer MLP sizes (e.g. OpenELM) do not fit it
        raise ModelError(f"Cannot give one mlp_in width for {type(model).__name__}: layers differ: {sorted(widths)}")
    return widths.pop()


# --- capture ------------------------------------------------------------------------------------------------


class Capture:
    """What `capture` yields. `buffers[layer]` gets one CPU tensor [batch, n_pos, width] per forward call.

    Tensors keep the model's dtype (bf16 stays bf16); the caller converts. Assign `positions` to reuse the
    hooks for the next batch; `clear()` drops what was captured.
    """

    def __init__(self, model_name: str, n_layers: int, positions: "torch.Tensor"):
        self.model_name = model_name
        self.buffers: list[list["torch.Tensor"]] = [[] for _ in range(n_layers)]
        self.positions = positions

    @property
    def positions(self) -> "torch.Tensor":
        return self._positions

    @positions.setter
    def positions(self, positions: "torch.Tensor") -> None:
        import torch

        if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.dtype != torch.long:
            if isinstance(positions, torch.Tensor):
                got = f"{positions.dtype} of shape {tuple(positions.shape)}"
            else:
                got = type(positions).__name__
            raise ConfigError(f"positions must be a LongTensor [batch, n_pos]. Got {got} instead.")
        self._positions = positions
        # Bounds kept on the CPU so the hooks check them without a device sync.
        self._lo = int(positions.min()) if positions.numel() else 0
        self._hi = int(positions.max()) if positions.numel() else -1
        self._on_device: dict = {}

    def _index(self, device) -> "torch.Tensor":
        index = self._on_device.get(device)
        if index is None:
            index = self._on_device[device] = self._positions.to(device)
        return index

    def _gather(self, layer: int, hidden: "torch.Tensor") -> None:
        import torch

        # hidden: [batch, seq, width]
        batch, seq = hidden.shape[0], hidden.shape[1]
        if batch != self._positions.shape[0] or self._lo < 0 or self._hi >= seq:
            raise ConfigError(
                f"positions {tuple(self._positions.shape)} with values {self._lo}..{self._hi} do not fit the "
                f"input of {self.model_name} [batch={batch}, seq={seq}]; pass absolute indices into the padded input"
            )
        index = self._index(hidden.device)  # [batch, n_pos]
        index = index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # [batch, n_pos, width]
        picked = torch.gather(hidden.detach(), 1, index)  # [batch, n_pos, width], its own storage
        self.buffers[layer].append(picked.to("cpu"))

    def stack(self, call: int = -1) -> "torch.Tensor":
        """[batch, n_layers, n_pos, width] from one forward call (the last by default), in the model dtype."""
        import torch

        if not all(self.buffers):
            raise ModelError(f"Nothing captured from {self.model_name}: run a forward pass inside capture()")
        return torch.stack([per_call[call] for per_call in self.buffers], dim=1)

    def clear(self) -> None:
        for per_call in self.buffers:
            per_call.clear()


@contextmanager
def _hooked(model: "torch.nn.Module", site: str, keep) -> Iterator[int]:
    """Hook every layer at `site`: keep(layer, tensor [batch, seq, width]) on each call; yields the layer count.
    The hooks are removed on exit, also after an exception."""
    hooks = site_hooks(model, site)
    handles = []
    try:
        for layer, (module, kind) in enumerate(hooks):
            if kind == "forward":

                def hook(_module, _args, output, layer=layer):
                    keep(layer, output)

                handles.append(module.register_forward_hook(hook))
            else:

                def pre_hook(_module, args, kwargs, layer=layer):
                    keep(layer, args if args else tuple(kwargs.values()))

                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield len(hooks)
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(model: "torch.nn.Module", site: str, positions: "torch.Tensor") -> Iterator[Capture]:
    """Hook every layer at `site` and keep only `positions` ([batch, n_pos] absolute indices into the padded
    input), copied to CPU inside the hook. Whole sequences are never kept.

        with capture(model, "resid", positions) as cap:
            model(**batch)
        acts = cap.stack()  # [batch, n_layers, n_pos, width], model dtype

    Hooks are removed on exit, also after an exception. Meant for plain forward passes: inside `generate`
    the later steps see one token and fail the position check (`record` reads a decoding).
    """
    cap = Capture(type(model).__name__, len(site_hooks(model, site)), positions)
    with _hooked(model, site, lambda layer, value: cap._gather(layer, _first_tensor(cap.model_name, value))):
        yield cap


def read_cells(lm, sequences: list[list[int]], positions, site: str | None, forward=None):
    """The one hooked forward pass over a batch of token sequences: the site's output at positions [batch, k]
    (indices into each unpadded sequence; negative ones, no exact answer, read the first token), as a CPU tensor
    [batch, layers, k, width] in the model's dtype; None when site is None (nothing hooked).

    The sequences are left-padded (decoding.left_pad); forward(input_ids, attention_mask) runs the pass, under
    inference mode, and may keep what it computes (log-probabilities); by default the base model runs without
    its head, since only the hooked values are wanted.
    """
    import numpy as np
    import torch

    from truthmap.lm.decoding import left_pad

    input_ids, attention_mask = left_pad(sequences, lm.tokenizer.pad_token_id)  # [batch, seq]
    offsets = np.array([input_ids.shape[1] - len(s) for s in sequences])[:, None]
    padded = torch.from_numpy(np.maximum(np.asarray(positions, dtype=np.int64), 0) + offsets)  # [batch, k]
    if forward is None:
        def forward(ids, mask):
            lm.model.base_model(input_ids=ids.to(lm.model.device), attention_mask=mask.to(lm.model.device))
    with torch.inference_mode(), capture(lm.model, site, padded) if site else _nothing() as cap:
        forward(input_ids, attention_mask)
    return cap.stack() if site else None


@contextmanager
def _nothing():
    yield None


class Recording:
    """What `record` yields: the site's output at every token a decoding feeds the model, per row of its batch.

    The first forward call (the prefill of the left-padded prompts) keeps each row's first token and the last
    `window` columns (the last `window` prompt tokens of every row); each later call feeds one token per row
    still writing, and keeps it. After each call the decoding loop names the rows it served (`took`,
    decoding.generate_batch), and the values go to the CPU: one copy per call rather than one per layer. Answer
    token j is fed at call j + 1, so `cells` finds the first token and any position from the prompt's last
    `window` tokens on: all that the probed positions (locate.token_positions) can be.

    A decoding that reuses the cache of a shared prefix (decoding.Prefix) feeds only the tokens after it:
    prefix_len says how many, and `first` holds the values at the prefix's first token, [layers, width] (the same
    for every row: a causal model's first position sees nothing else).
    """

    def __init__(self, model_name: str, n_layers: int, prompt_lengths: list[int], window: int, prefix_len: int = 0,
                 first=None, dtype=None):
        self.model_name, self.window, self.dtype = model_name, window, dtype
        self.prompt_lengths = [n - prefix_len for n in prompt_lengths]  # what the prefill is fed
        self.prefix_len = prefix_len
        self.first = first if first is None or dtype is None else first.to(dtype)
        self.pending: list = [None] * n_layers  # this call's [rows, k, width] per layer, on the model's device
        self.calls: list[tuple[list[int], "torch.Tensor"]] = []  # (rows, [rows, layers, k, width] on the CPU)

    def _keep(self, layer: int, hidden: "torch.Tensor") -> None:
        import torch

        if self.pending[layer] is not None:
            raise ModelError(f"Cannot record {self.model_name}: layer {layer} ran twice in one forward pass")
        kept = hidden[:, -min(self.window, hidden.shape[1]) :, :]  # [rows, k, width]
        if not self.calls:  # the prefill: each row's first token too, after its left padding
            first = torch.tensor([hidden.shape[1] - n for n in self.prompt_lengths], device=hidden.device)
            kept = torch.cat([hidden[torch.arange(len(first), device=hidden.device), first][:, None], kept], dim=1)
        self.pending[layer] = kept.detach().clone()  # not a view: the whole output would stay alive

    def took(self, rows: list[int]) -> None:
        """The forward call just made served these rows (indices into the batch's prompts), in this order."""
        import torch

        if any(value is None for value in self.pending):
            raise ModelError(f"Nothing recorded from {self.model_name} at some layer: run a forward pass inside record()")
        values = torch.stack(self.pending, dim=1).to("cpu", self.dtype)  # [rows, layers, k, width]
        self.calls.append((list(rows), values))
        self.pending = [None] * len(self.pending)

    def cells(self, row: int, prompt_len: int, positions) -> "torch.Tensor":
        """[layers, len(positions), width], model dtype: row's values at positions (indices into its unpadded
        prompt + answer, the answers table's positions)."""
        import torch

        prefill_rows, prefill = self.calls[0]  # [rows, layers, 1 + window, width]
        window = prefill.shape[2] - 1
        columns = []
        prompt_len -= self.prefix_len
        for position in positions:
            if self.prefix_len and position == 0:
                columns.append(self.first)
                continue
            position -= self.prefix_len
            step = position - prompt_len + 1  # the call that fed it; 0: the prefill
            if position == 0:
                columns.append(prefill[prefill_rows.index(row), :, 0])
            elif step <= 0 and window - (prompt_len - position) >= 0:
                columns.append(prefill[prefill_rows.index(row), :, 1 + window - (prompt_len - position)])
            elif 0 < step < len(self.calls) and row in self.calls[step][0]:
                rows, values = self.calls[step]
                columns.append(values[rows.index(row), :, 0])
            else:
                raise ModelError(f"Position {position + self.prefix_len} of row {row} was not recorded (prompt of "
                                 f"{prompt_len + self.prefix_len} tokens, {self.prefix_len} of them a shared prefix, "
                                 f"{len(self.calls)} calls, a window of {window}).")
        return torch.stack(columns, dim=1)


RECORD_WINDOW = 8  # the last eight tokens of prompt + answer are probed positions


@contextmanager
def record(model: "torch.nn.Module", site: str, prompts: list[list[int]], window: int = RECORD_WINDOW,
           prefix_len: int = 0, first=None, dtype=None) -> Iterator[Recording]:
    """Hook every layer at `site` for one decoding of `prompts` (decoding.generate_batch(..., recording=...)).

    Only each prompt's first token and last `window` tokens, then one column per later step, are kept (see
    Recording): never a whole sequence. prefix_len, first: the decoding reuses the cache of the prompts' first
    prefix_len tokens, and first [layers, width] is the site's output at token 0 (see Recording). dtype: what the
    values are kept in (None: the model's); the store's float16 halves what a batch holds, for the same bytes."""
    name = type(model).__name__
    recording = Recording(name, len(site_hooks(model, site)), [len(p) for p in prompts], window, prefix_len, first,
                          dtype)
    with _hooked(model, site, lambda layer, value: recording._keep(layer, _first_tensor(name, value))):
        yield recording


def _first_tensor(model_name: str, value) -> "torch.Tensor":
    """The tensor a hook sees: a plain tensor, or the first element of a tuple (attention returns (output,
    weights); older decoder layers return (hidden, cache, ...))."""
    import torch

    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor) or value.dim() != 3:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ModelError(f"Cannot capture from {model_name}: expected a [batch, seq, width] tensor, got {got}")
    return value
