import numpy as np
import pandas as pd
import pytest

from truthmap.stages.activations import extract_activations, open_store
from truthmap.errors import StoreError
from truthmap.stages.locate import token_positions
from truthmap.rundir import POSITIONS, position_column
from truthmap.lm.sites import decoder_layers


def make_table(tokenizer, n=7):
    rows = []
    for i in range(n):
        prompt = tokenizer(f"What is the capital of France? {'Paris ' * i}", add_special_tokens=False)["input_ids"]
        answer = tokenizer(f"The capital is Paris{'.' * i}", add_special_tokens=False)["input_ids"]
        exact = (3, 4) if i % 3 else None  # some rows without an exact answer
        found = token_positions(len(prompt), len(answer), exact)
        rows.append({"prompt_ids": prompt, "answer_ids": answer} | {position_column(p): found[p] for p in POSITIONS})
    return pd.DataFrame(rows)


def reference(lm, table, site):
    """Plain per-sample forward passes without padding: output_hidden_states for resid, a hook on the MLP for mlp.

    For resid the last layer is left out: hidden_states[-1] comes after the final norm, the store holds the raw
    block output (checked separately below)."""
    import torch

    layers = decoder_layers(lm.model)
    out = []
    for _, row in table.iterrows():
        ids = torch.tensor([list(row.prompt_ids) + list(row.answer_ids)])
        pos = [max(row[position_column(p)], 0) for p in POSITIONS]
        kept = []
        hooks = [layer.mlp.register_forward_hook(lambda m, a, o: kept.append(o)) for layer in layers]
        with torch.no_grad():
            hidden = lm.model(ids, output_hidden_states=True).hidden_states
        for h in hooks:
            h.remove()
        if site == "resid":
            per_layer = [hidden[i + 1][0, pos] for i in range(len(layers) - 1)] + [hidden[-1][0, pos]]
        else:
            per_layer = [k[0, pos] for k in kept]
        out.append(torch.stack(per_layer).numpy())
    return np.stack(out)  # [samples, layers, 15, hidden]


@pytest.mark.parametrize("site", ["resid", "mlp"])
def test_store_equals_plain_forward_passes(tiny, tmp_path, site):
    table = make_table(tiny.tokenizer)
    extract_activations(tiny, table, tmp_path / site, site, batch_size=3, run_settings={"x": 1})
    acts, meta = open_store(tmp_path / site)
    assert acts.shape == (7, 2, 15, 32) and meta["written"] == 7
    import torch

    expected = reference(tiny, table, site)
    got = np.asarray(acts, dtype=np.float32)
    if site == "resid":  # the stored last layer is the raw block output; the model's final norm maps it onward
        got[:, -1] = tiny.model.model.norm(torch.from_numpy(got[:, -1])).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=5e-3, atol=5e-3)  # float16 storage


def test_killed_store_resumes_to_the_same_bytes(tiny, tmp_path, monkeypatch):
    import truthmap.stages.activations as activations

    table = make_table(tiny.tokenizer)
    extract_activations(tiny, table, tmp_path / "whole", "mlp", batch_size=2, run_settings={})
    real_read, calls = activations.read_positions, []

    def dies_on_third_batch(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_read(*args)

    monkeypatch.setattr(activations, "read_positions", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        extract_activations(tiny, table, tmp_path / "killed", "mlp", batch_size=2, run_settings={})
    with pytest.raises(StoreError, match=r"killed are incomplete \(4 of 7 samples\)\. Rerun `truthmap extract`"):
        open_store(tmp_path / "killed")
    monkeypatch.setattr(activations, "read_positions", real_read)
    extract_activations(tiny, table, tmp_path / "killed", "mlp", batch_size=2, run_settings={})
    whole = (tmp_path / "whole" / "acts.f16").read_bytes()
    assert (tmp_path / "killed" / "acts.f16").read_bytes() == whole


def test_resume_refuses_other_settings(tiny, tmp_path):
    table = make_table(tiny.tokenizer)
    extract_activations(tiny, table, tmp_path, "mlp", batch_size=4, run_settings={"model": "a"})
    with pytest.raises(StoreError, match=r"was made with answers=.*Use another --runs-dir, or delete that directory"):
        extract_activations(tiny, table, tmp_path, "mlp", batch_size=4, run_settings={"model": "b"})


def test_extraction_batches_bound_rows_and_tokens(monkeypatch):
    from truthmap.stages import activations
    from truthmap.executor import deal_batches

    monkeypatch.setattr(activations, "EXTRACT_TOKENS", 100)
    lengths = [30, 120, 10, 50, 25, 25, 40, 10, 5, 33]
    cut = activations.extraction_batches(lengths, batch_size=4)
    assert cut == [[1], [3, 6], [9, 0, 4], [5, 2, 7, 8]]  # 120 alone; 2 x 50 and 3 x 33 fit, not 3 x 50; 4 rows at most
    assert sorted(i for batch in cut for i in batch) == list(range(len(lengths)))
    for shard in deal_batches(cut, 2):  # a shard re-cuts its rows into the very batches it was dealt
        again = activations.extraction_batches([lengths[i] for i in shard], batch_size=4)
        assert [[shard[i] for i in batch] for batch in again] == [b for b in cut if b[0] in shard]


def test_cell_store_reads_one_cell_at_a_time(tmp_path):
    from truthmap.stages.activations import CellStore

    file_shape = (3, 4, 5, 2)  # layers, positions, samples, hidden
    values = np.arange(np.prod(file_shape), dtype=np.float16).reshape(file_shape)
    values.tofile(tmp_path / "acts.f16")
    acts = CellStore(tmp_path / "acts.f16", file_shape)
    assert acts.shape == (5, 3, 4, 2) and len(acts) == 5
    np.testing.assert_array_equal(acts[:, 2, 1, :], values[2, 1])
    np.testing.assert_array_equal(acts[:, -1, -1, :], values[2, 3])
    np.testing.assert_array_equal(np.asarray(acts, dtype=np.float32), values.transpose(2, 0, 1, 3))
    with pytest.raises(IndexError, match="one cell at a time"):
        acts[0]
    with pytest.raises(IndexError):
        acts[:, 3, 0, :]
    CellStore(tmp_path / "acts.f16", (3, 4, 6, 2))[:, 0, 0, :]  # the first cell still fits in the file
    with pytest.raises(StoreError, match=r"acts\.f16 is shorter than its meta\.json says; extract the"):
        CellStore(tmp_path / "acts.f16", (3, 4, 6, 2))[:, 2, 3, :]


def test_embedding_store_is_the_input_to_the_first_block(tiny, tmp_path):
    """embed.f16 holds hidden_states[0] (the input embedding) at the 15 positions; an older store reads without it."""
    import torch

    from truthmap.stages.activations import open_embedding
    from truthmap.rundir import read_json, write_json

    table = make_table(tiny.tokenizer)
    extract_activations(tiny, table, tmp_path, "mlp", batch_size=3, run_settings={})
    acts, meta = open_store(tmp_path)
    embed = open_embedding(tmp_path, meta)
    assert embed.shape == (7, 1, 15, 32) and meta["embed_shape"] == [1, 15, 7, 32]
    for i, row in table.iterrows():
        ids = torch.tensor([list(row.prompt_ids) + list(row.answer_ids)])
        with torch.no_grad():
            first = tiny.model(ids, output_hidden_states=True).hidden_states[0][0]  # [seq, hidden]
        pos = [max(row[position_column(p)], 0) for p in POSITIONS]
        np.testing.assert_allclose(np.asarray(embed, dtype=np.float32)[i, 0], first[pos].numpy(), rtol=5e-3, atol=5e-3)

    old = {k: v for k, v in meta.items() if k != "embed_shape"}  # a store made before the embedding row
    write_json(tmp_path / "meta.json", old)
    assert open_embedding(tmp_path, read_json(tmp_path / "meta.json")) is None
    assert open_store(tmp_path)[0].shape == acts.shape


@pytest.mark.parametrize("recorded", [np.float32, np.float16])
def test_rows_land_in_their_cells_clipped_to_float16(tmp_path, recorded):
    from truthmap.stages.activations import create_or_resume, store_meta, write_rows

    meta = create_or_resume(tmp_path, store_meta({}, "mlp", 6, n_layers=2, hidden=4, model_dtype="float32",
                                                 embed_width=3))
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 2, len(POSITIONS), 4)).astype(np.float32)
    values[0, 1, 2, 3], values[2, 0, 0, 0] = 1e6, -1e6  # beyond float16's range
    embedded = rng.standard_normal((3, len(POSITIONS), 3)).astype(np.float32)
    rows = [4, 0, 5]  # scattered, with a run of consecutive rows (4, 5) written out of order
    with np.errstate(over="ignore"):  # float16 holds the two as inf, as a recording cast to float16 does
        write_rows(tmp_path, meta, rows, values.astype(recorded), embedded)

    assert meta["clipped"] == 2
    acts = np.fromfile(tmp_path / "acts.f16", dtype=np.float16).reshape(meta["shape"])
    expected = np.clip(values, -65504, 65504).astype(np.float16).transpose(1, 2, 0, 3)
    np.testing.assert_array_equal(acts[:, :, rows], expected)
    np.testing.assert_array_equal(acts[:, :, [1, 2, 3]], 0)  # rows not written stay zero
    assert acts[1, 2, 4, 3] == 65504 and acts[0, 0, 5, 0] == -65504
    embed = np.fromfile(tmp_path / "embed.f16", dtype=np.float16).reshape(meta["embed_shape"])
    np.testing.assert_array_equal(embed[0][:, rows], embedded.astype(np.float16).transpose(1, 0, 2))
