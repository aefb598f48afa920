"""Layer and site resolution on one tiny random model per family, and capture() against manual hooks."""

from contextlib import ExitStack
from types import SimpleNamespace

import numpy as np
import pytest

import torch  # noqa: E402
import transformers  # noqa: E402

from truthmap.errors import ConfigError, ModelError  # noqa: E402
from truthmap.lm.sites import (  # noqa: E402
    SITES,
    capture,
    decoder_layers,
    num_layers,
    site_hooks,
    site_width,
)

HIDDEN, INTERMEDIATE, VOCAB = 32, 48, 64
TOKENS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
COMMON = dict(
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    **TOKENS,
)


def _build(family: str):
    T = transformers
    if family == "gpt2":
        config = T.GPT2Config(n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=2, n_head=4, **TOKENS)
    else:
        config_class = {
            "llama": T.LlamaConfig,
            "mistral": T.MistralConfig,
            "qwen2": T.Qwen2Config,
            "gemma2": T.Gemma2Config,
            "gemma3": T.Gemma3TextConfig,
            "phi3": T.Phi3Config,
        }[family]
        config = config_class(**COMMON)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).eval()


FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt2", "phi3")


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, _build(request.param)


def _expected(family, model, site):
    """The modules the family's own layout says each site reads."""
    if family == "gpt2":
        layers = list(model.transformer.h)
        attn, down = "attn", "c_proj"
    else:
        layers = list(model.model.layers)
        attn, down = "self_attn", "down_proj"
    return {
        "resid": [(b, "forward") for b in layers],
        "attn": [(getattr(b, attn), "forward") for b in layers],
        "mlp": [(b.mlp, "forward") for b in layers],
        "mlp_in": [(getattr(b.mlp, down), "forward_pre") for b in layers],
    }[site]


def test_layers_resolve_on_wrapper_and_base_model(family_model):
    family, model = family_model
    base = model.transformer if family == "gpt2" else model.model
    assert num_layers(model) == 2
    assert [id(b) for b in decoder_layers(model)] == [id(b) for b in decoder_layers(base)]
    assert [id(b) for b in decoder_layers(model)] == [id(m) for m, _ in _expected(family, model, "resid")]


@pytest.mark.parametrize("site", SITES)
def test_each_site_resolves_with_its_width(family_model, site):
    family, model = family_model
    got = site_hooks(model, site)
    want = _expected(family, model, site)
    assert [(id(m), kind) for m, kind in got] == [(id(m), kind) for m, kind in want]
    assert site_width(model, site) == (INTERMEDIATE if site == "mlp_in" else HIDDEN)


def test_capture_shape_and_dtype_per_family(family_model):
    _, model = family_model
    ids = torch.randint(3, VOCAB, (2, 5))
    positions = torch.tensor([[0, 4], [2, 3]])
    caps = {}
    with ExitStack() as stack, torch.no_grad():
        for site in SITES:  # all four sites in one forward pass
            caps[site] = stack.enter_context(capture(model, site, positions))
        model(input_ids=ids)
    for site, cap in caps.items():
        acts = cap.stack()
        assert acts.shape == (2, 2, 2, site_width(model, site))  # [batch, n_layers, n_pos, width]
        assert acts.dtype == torch.float32 and acts.device.type == "cpu"


# --- errors ------------------------------------------------------------------------------------------------


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(HIDDEN, 3 * HIDDEN)


class _Block(torch.nn.Module):
    def __init__(self, with_mlp=False, with_attn=True):
        super().__init__()
        if with_attn:
            self.attn = _Attention()
        self.proj = torch.nn.Linear(HIDDEN, HIDDEN)  # a lone Linear is not an MLP
        if with_mlp:
            self.mlp = torch.nn.Sequential(torch.nn.Linear(HIDDEN, 8), torch.nn.Linear(8, 8))  # never writes hidden


class FooForCausalLM(torch.nn.Module):
    def __init__(self, layers=True, **block):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2, hidden_size=HIDDEN)
        if layers:
            self.blocks = torch.nn.ModuleList([_Block(**block) for _ in range(2)])


def test_unknown_architecture_names_class_and_what_was_looked_for():
    model = FooForCausalLM()
    assert num_layers(model) == 2
    assert site_width(model, "resid") == HIDDEN
    msg = (
        "Cannot find the MLP of layer 0 in FooForCausalLM: looked for a child named mlp, feed_forward, ffn, ff, "
        "or one child whose Linear layers read and write the hidden size 32"
    )
    for site in ("mlp", "mlp_in"):
        with pytest.raises(ModelError, match=f"^{msg}$".replace("(", r"\(")):
            site_hooks(model, site)
    with pytest.raises(ModelError, match=f"^{msg}$"):
        site_width(model, "mlp_in")


def test_missing_layers_attention_and_down_projection():
    with pytest.raises(
        ModelError, match=r"^Cannot find the decoder layers of FooForCausalLM: looked for an nn.ModuleList of 2 blocks$"
    ):
        decoder_layers(FooForCausalLM(layers=False))
    with pytest.raises(
        ModelError,
        match=r"^Cannot find the attention of layer 0 in FooForCausalLM: looked for one child whose name "
        r"contains attn or attention and that holds Linear layers$",
    ):
        site_hooks(FooForCausalLM(with_attn=False), "attn")
    with pytest.raises(
        ModelError,
        match=r"^Cannot find the down projection of layer 0 in FooForCausalLM: looked for a Linear or Conv1D "
        r"child of Sequential with output size 32$",
    ):
        site_hooks(FooForCausalLM(with_mlp=True), "mlp_in")


def test_unknown_site_and_bad_positions():
    model = _build("llama")
    with pytest.raises(ConfigError, match=r"^Unknown site 'mlp_out'\. Did you mean: mlp_in, mlp\? Available: mlp, "
                                          r"mlp_in, attn, resid\.$"):
        site_hooks(model, "mlp_out")
    with pytest.raises(ConfigError, match=r"^positions must be a LongTensor \[batch, n_pos\]\. Got torch.float32"):
        with capture(model, "resid", torch.zeros(2, 1)):
            pass


# --- capture against the model's own outputs on a tiny Llama ----------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return _build("llama")


@pytest.fixture(scope="module")
def left_padded():
    """Three rows, left padded to 7, with different positions per row (last token, and one earlier)."""
    torch.manual_seed(1)
    lengths = [7, 4, 5]
    ids = torch.randint(3, VOCAB, (3, 7))
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, : 7 - n] = 0
        mask[row, 7 - n :] = 1
    positions = torch.tensor([[6, 1], [6, 3], [6, 2]])  # [batch, n_pos], all on real tokens
    return ids, mask, positions


def _at(t, positions):
    """t [batch, seq, width] -> [batch, n_pos, width] by plain indexing, the reference for gather."""
    return torch.stack([t[row, positions[row]] for row in range(t.shape[0])])


def _hook_snapshot(model):
    return {
        name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()
    }


def test_resid_matches_hidden_states_and_final_norm(llama, left_padded):
    ids, mask, positions = left_padded
    layers = llama.model.layers
    manual = []
    handle = layers[-1].register_forward_hook(lambda m, a, out: manual.append(out if torch.is_tensor(out) else out[0]))
    try:
        with capture(llama, "resid", positions) as cap, torch.no_grad():
            out = llama(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        handle.remove()
    acts = cap.stack()  # [batch, n_layers, n_pos, hidden]
    assert acts.shape == (3, 2, 2, HIDDEN)
    hs = out.hidden_states
    for i in range(len(layers) - 1):
        torch.testing.assert_close(acts[:, i], _at(hs[i + 1], positions), rtol=0, atol=0)
    # The last entry of hidden_states is after the final norm; the raw block output is what we hook.
    torch.testing.assert_close(acts[:, -1], _at(manual[0], positions), rtol=0, atol=0)
    assert not torch.allclose(acts[:, -1], _at(hs[-1], positions))
    torch.testing.assert_close(llama.model.norm(acts[:, -1]), _at(hs[-1], positions))


@pytest.mark.parametrize(
    "site, module_of, pre",
    [
        ("mlp", lambda block: block.mlp, False),
        ("mlp_in", lambda block: block.mlp.down_proj, True),
        ("attn", lambda block: block.self_attn, False),
    ],
)
def test_sites_match_manual_hooks(llama, left_padded, site, module_of, pre):
    ids, mask, positions = left_padded
    manual, handles = {}, []
    for i, block in enumerate(llama.model.layers):
        if pre:
            hook = lambda m, args, i=i: manual.__setitem__(i, args[0])  # noqa: E731
            handles.append(module_of(block).register_forward_pre_hook(hook))
        else:
            hook = lambda m, args, out, i=i: manual.__setitem__(i, out if torch.is_tensor(out) else out[0])  # noqa: E731
            handles.append(module_of(block).register_forward_hook(hook))
    try:
        with capture(llama, site, positions) as cap, torch.no_grad():
            llama(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    acts = cap.stack()
    width = INTERMEDIATE if site == "mlp_in" else HIDDEN
    assert acts.shape == (3, 2, 2, width)
    for i in range(2):
        assert manual[i].shape == (3, 7, width)
        torch.testing.assert_close(acts[:, i], _at(manual[i], positions), rtol=0, atol=0)


def test_only_positions_are_kept_on_cpu(llama, left_padded):
    ids, mask, positions = left_padded
    with capture(llama, "mlp_in", positions) as cap, torch.no_grad():
        llama(input_ids=ids, attention_mask=mask)
    for per_call in cap.buffers:
        (t,) = per_call
        assert t.device.type == "cpu" and t.shape == (3, 2, INTERMEDIATE)
        # its own storage, not a view into the whole [batch, seq, width] activation
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_one_entry_per_forward_call_and_new_positions(llama, left_padded):
    ids, mask, positions = left_padded
    with capture(llama, "resid", positions) as cap, torch.no_grad():
        llama(input_ids=ids, attention_mask=mask)
        first = cap.stack()
        cap.positions = torch.tensor([[5], [4], [6]])
        llama(input_ids=ids, attention_mask=mask)
    assert [len(b) for b in cap.buffers] == [2, 2]
    torch.testing.assert_close(cap.stack(call=0), first)
    torch.testing.assert_close(cap.stack()[2, :, 0], first[2, :, 0])  # row 2 kept position 6
    assert cap.stack().shape == (3, 2, 1, HIDDEN)
    cap.clear()
    with pytest.raises(ModelError, match=r"^Nothing captured from LlamaForCausalLM: run a forward pass inside"):
        cap.stack()


def test_model_dtype_is_kept():
    model = _build("llama").to(torch.bfloat16)
    with capture(model, "mlp", torch.tensor([[0, 2]])) as cap, torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert cap.stack().dtype == torch.bfloat16


def test_hooks_removed_after_context_and_after_exception(llama, left_padded):
    ids, mask, positions = left_padded
    # transformers installs its own output-capturing hooks lazily and keeps them, so compare, don't count.
    with torch.no_grad():
        llama(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    before = _hook_snapshot(llama)
    for site in SITES:
        with capture(llama, site, positions):
            assert _hook_snapshot(llama) != before
        assert _hook_snapshot(llama) == before

        with pytest.raises(RuntimeError, match="boom"):
            with capture(llama, site, positions):
                raise RuntimeError("boom")
        assert _hook_snapshot(llama) == before

    # An error inside a hook (positions past the sequence) also leaves no hook behind.
    with pytest.raises(
        ConfigError,
        match=r"^positions \(3, 2\) with values 1\.\.9 do not fit the input of LlamaForCausalLM \[batch=3, seq=7\]",
    ):
        with capture(llama, "mlp_in", torch.tensor([[9, 1], [6, 3], [6, 2]])), torch.no_grad():
            llama(input_ids=ids, attention_mask=mask)
    assert _hook_snapshot(llama) == before


def test_gemma3_mlp_site_reads_the_mlp_output_before_its_post_norm():
    """What the README says: in Gemma 3 the residual receives post_feedforward_layernorm(mlp), and `mlp` reads the
    MLP's own output, the norm's input."""
    model = _build("gemma3")
    seen = []
    block = model.model.layers[1]
    handle = block.post_feedforward_layernorm.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
    positions = torch.tensor([[0, 3]])
    try:
        with torch.no_grad(), capture(model, "mlp", positions) as cap:
            model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    finally:
        handle.remove()
    norm_in, norm_out = seen[0]  # [1, 4, hidden]
    captured = cap.stack()[0, 1]  # [n_pos, hidden], layer 1
    assert torch.allclose(captured, norm_in[0, [0, 3]])
    assert not torch.allclose(captured, norm_out[0, [0, 3]])


# --- recording a decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("site", ["mlp", "mlp_in", "attn", "resid"])
def test_recorded_decoding_equals_a_full_forward_pass(tiny, site):
    """What a KV-cache decoding records at every fed token is a forward pass over prompt + answer, up to float
    rounding: the prompt's last 8 tokens from the prefill, each answer token from the step that fed it, the last
    one (of a row that ran to the token limit) from the extra pass."""
    from truthmap.stages.activations import read_positions
    from truthmap.lm.decoding import generate_batch
    from truthmap.lm.models import encode_prompt
    from truthmap.lm.sites import record

    questions = ["What is the capital of France?", "Zürich?", "In which country is the city of Tromsø? Answer:", "What?"]
    prompts = [encode_prompt(tiny.tokenizer, q, True) for q in questions]
    free = generate_batch(tiny.model, tiny.tokenizer, prompts, 7, [10**9])
    stop_at = free[1].token_ids[3]  # row 1 stops early, others may run to the limit
    with record(tiny.model, site, prompts) as recording:
        made = generate_batch(tiny.model, tiny.tokenizer, prompts, 7, [stop_at], recording=recording)
    assert made[1].stopped and len(made[1].token_ids) <= 3 and any(not g.stopped for g in made)
    for row, (prompt, generation) in enumerate(zip(prompts, made)):
        sequence = prompt + generation.token_ids
        positions = [0, *range(len(prompt) - 8, len(sequence))]  # every recorded position
        got = recording.cells(row, len(prompt), positions).float().numpy()  # [layers, positions, width]
        expected = read_positions(tiny, [sequence], [positions], site)[0]  # [layers, positions, width]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()  # float32 rounding, not a wrong token
    before = len(prompts[0]) - 9  # before the window
    with pytest.raises(ModelError, match=rf"^Position {before} of row 0 was not recorded"):
        recording.cells(0, len(prompts[0]), [before])


@pytest.mark.parametrize("site", ["mlp", "resid"])
def test_recording_after_a_shared_prefix_equals_a_full_forward_pass(tiny, site):
    """With the chat template's shared first tokens encoded once (generate.batch_prefix), the decoding writes the
    same tokens, and the recording holds the same values at every position it is asked for, token 0 included
    (from the prefix's own pass); a position inside the prefix other than 0 was never recorded."""
    from truthmap.stages.activations import read_positions
    from truthmap.lm.decoding import generate_batch
    from truthmap.stages.generate import MIN_PREFIX, batch_prefix
    from truthmap.lm.models import encode_prompt
    from truthmap.lm.sites import record

    preamble = "Question: Long answer: Exact answer: "  # as a system turn would be: the same first tokens for all
    questions = ["What is the capital of France?", "Zürich and Tromsø, cities of the north?", "What? 0123"]
    prompts = [encode_prompt(tiny.tokenizer, preamble + q, True) for q in questions]
    prefix, first = batch_prefix(tiny, prompts, site)
    assert prefix is not None and len(prefix.ids) >= MIN_PREFIX and first.shape[0] == len(tiny.model.model.layers)
    assert all(len(p) - len(prefix.ids) >= 9 for p in prompts)
    whole = generate_batch(tiny.model, tiny.tokenizer, prompts, 6, [10**9])
    with record(tiny.model, site, prompts, prefix_len=len(prefix.ids), first=first) as recording:
        made = generate_batch(tiny.model, tiny.tokenizer, prompts, 6, [10**9], recording=recording, prefix=prefix)
    assert [g.token_ids for g in made] == [g.token_ids for g in whole]
    for row, (prompt, generation) in enumerate(zip(prompts, made)):
        sequence = prompt + generation.token_ids
        positions = [0, *range(len(prompt) - 8, len(sequence))]
        got = recording.cells(row, len(prompt), positions).float().numpy()
        expected = read_positions(tiny, [sequence], [positions], site)[0]
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    inside = len(prefix.ids) - 1
    with pytest.raises(ModelError, match=rf"^Position {inside} of row 0 was not recorded .*{len(prefix.ids)} of them a shared prefix"):
        recording.cells(0, len(prompts[0]), [inside])
