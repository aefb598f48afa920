"""Stage 4: activations of every layer at the probed positions, written to a float16 file on disk.

One batched forward pass over prompt + answer per batch, with hooks that keep only the 15 probed positions,
so memory is bounded by the batch, not the dataset. The store is cell-major, [layers, positions, samples,
hidden], so a probe reading one (layer, position) cell touches only that cell's bytes; `open_store` returns it
as a `CellStore`, indexed [samples, layers, positions, hidden] one cell at a time.
Beside it, embed.f16 holds the input embedding (the output of the model's input embedding module, before the
first block) at the same positions, [1, positions, samples, hidden]: the token-identity floor of the heatmap. It
needs no forward pass (a lookup of the tokens at the positions) and costs 1/layers of the store. A store made
before it existed has no "embed_shape" in meta.json: it is still read, and the heatmap goes without that row.
Neither side keeps the file mapped: a mapping keeps every page it touched resident and counted in the process's
RSS (all 5 GB of a 10,000-sample store once every cell has been read), while file reads and a mapping dropped
after each batch leave those pages to the kernel's page cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from truthmap.batches import run_batches
from truthmap.errors import StoreError
from truthmap.rundir import (
    POSITIONS,
    ROOM,
    STORE_DTYPE,
    STORE_LAYOUT,
    Store,
    human_size,
    position_column,
    read_json,
    space_for,
    write_json,
)
from truthmap.runstate import check_matches

FLOAT16_MAX = 65504.0
# Padded tokens per forward pass. On 2 CPU cores a pass of 64 x 155 tokens took 1.4 GB of transient memory and was
# no faster than 8 x 155 (250 MB): beyond about a thousand tokens a bigger batch only costs memory.
EXTRACT_TOKENS = 1024


# What a resumed store must share with the store on disk: every setting that changes the numbers written.
# The device counts by kind only (cuda:0 and cuda:1 compute alike; cpu and cuda do not).
RESUME_KEYS = ("answers", "site", "positions", "model_dtype", "device")
META_FIX = "delete it and rerun `truthmap extract` with the same options to extract these activations again"


def device_kind(device: str) -> str:
    return str(device).split(":")[0]


def store_meta(run_settings: dict, site: str, n_samples: int, n_layers: int, hidden: int, model_dtype: str,
               device: str = "cpu", embed_width: int | None = None, one_pass: bool = False) -> dict:
    """one_pass: the cells were recorded while the answers were generated (write_answer_cells), not read by a
    second forward pass over them (extract_activations); the two agree up to float rounding."""
    return {
        "answers": run_settings,  # what made the answers these activations belong to
        "site": site,
        "positions": list(POSITIONS),
        "layout": STORE_LAYOUT,
        "shape": [n_layers, len(POSITIONS), n_samples, hidden],
        **({"embed_shape": [1, len(POSITIONS), n_samples, embed_width]} if embed_width else {}),
        "dtype": STORE_DTYPE,
        "model_dtype": model_dtype,
        "device": device_kind(device),
        "written": 0,  # samples done, counted in the (deterministic) processing order
        "clipped": 0,  # values beyond the float16 range, clipped to +-65504
        "one_pass": one_pass,
    }


def processing_order(lengths: list[int]) -> list[int]:
    """Longest first, stable: batches of similar length pad little, and the order is the same on resume."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def extraction_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in processing order, cut into batches of at most batch_size rows and EXTRACT_TOKENS padded tokens
    (a longer sequence goes alone). A batch closes on its own count and first (longest) length only, so cutting
    any run of whole batches again gives the same batches: Ray shards extract exactly the local run's batches."""
    cut = []
    for i in processing_order(lengths):
        if cut and len(cut[-1]) < batch_size and (len(cut[-1]) + 1) * lengths[cut[-1][0]] <= EXTRACT_TOKENS:
            cut[-1].append(i)
        else:
            cut.append([i])
    return cut


def extract_activations(lm, table, directory: Path, site: str, batch_size: int, run_settings: dict) -> Path:
    """Fill directory/acts.f16 for every row of the answers table; resumes after the last finished batch."""
    import numpy as np

    directory = Path(directory)
    meta_path = Store(directory).meta
    if meta_path.exists() and "rows_written" in read_json(meta_path, META_FIX):
        # A store begun while generating, left unfinished when that run went on with another site: its rows are
        # not a run of this stage's batches, so it starts over.
        meta_path.unlink()
    meta = create_or_resume(directory, new_meta(lm, site, len(table), run_settings))
    sequences = [list(p) + list(a) for p, a in zip(table["prompt_ids"], table["answer_ids"])]
    positions = np.stack([table[position_column(p)].to_numpy() for p in POSITIONS], axis=1)  # [samples, 15]
    cut = extraction_batches([len(s) for s in sequences], batch_size)
    starts = np.cumsum([0] + [len(batch) for batch in cut])  # "written" is always a whole number of batches
    done = {batch[0] for batch, start in zip(cut, starts) if start < meta["written"]}

    def extract(one):  # the runner's batch is one of `cut`: the store says what is done, in whole batches
        (batch,) = one
        batch_sequences = [sequences[i] for i in batch]
        values = read_positions(lm, batch_sequences, positions[batch], site)
        write_rows(directory, meta, batch, values, read_embeddings(lm, batch_sequences, positions[batch]))
        meta["written"] += len(batch)
        write_json(meta_path, meta)

    run_batches(cut, extract, None, batch_size=1, key=lambda batch: batch[0], done=done, size=len,
                description=f"Extracting {site} activations")
    return directory


def new_meta(lm, site: str, n_samples: int, run_settings: dict, one_pass: bool = False) -> dict:
    from truthmap.lm.sites import num_layers, site_width

    embed_width = lm.model.get_input_embeddings().embedding_dim
    return store_meta(run_settings, site, n_samples, num_layers(lm.model), site_width(lm.model, site), lm.dtype,
                      lm.device, embed_width, one_pass)


def create_or_resume(directory: Path, meta: dict) -> dict:
    """The meta of the store in directory: the one on disk when its settings and shape are meta's (else an error
    naming the first that differs), or meta, with new zeroed files."""
    import numpy as np

    store = Store(directory)
    meta_path, store_path = store.meta, store.acts
    if meta_path.exists() and store_path.exists():
        saved = read_json(meta_path, META_FIX)
        check_matches(saved, {k: meta[k] for k in (*RESUME_KEYS, "shape")}, directory)
        return saved
    directory.mkdir(parents=True, exist_ok=True)
    check_space(directory, meta)
    np.memmap(store_path, dtype=np.float16, mode="w+", shape=tuple(meta["shape"])).flush()
    np.memmap(store.embed, dtype=np.float16, mode="w+", shape=tuple(meta["embed_shape"])).flush()
    write_json(meta_path, meta)
    return meta


def check_space(directory: Path, meta: dict) -> None:
    """The store's size is known before its first row is written: one that cannot fit is refused now, not when
    the disk fills halfway through the run."""
    import math

    needed = 2 * (math.prod(meta["shape"]) + math.prod(meta.get("embed_shape", [0])))  # float16: 2 bytes a value
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise StoreError(f"Not enough disk space for {directory}: the store needs {human_size(needed)}, and "
                         f"{human_size(free)} are free there. {ROOM}")


def write_rows(directory: Path, meta: dict, rows: list[int], values, embedded) -> None:
    """values [batch, layers, 15, hidden] and embedded [batch, 15, width] (float32, or float16 as recorded) into the
    store's rows, clipped to float16; meta["clipped"] counts the values clipped, and writing meta.json is the
    caller's. Written by file writes, not a mapping (see the top). Not synced to disk: a killed process loses
    nothing the kernel already holds, and meta.json, which says what is written, is not synced either (syncing
    each batch cost twice the writes: 0.5 s for 64 rows of SmolLM2 on this machine's disk)."""
    store = Store(directory)
    meta["clipped"] += _write_cells(store.acts, meta["shape"], rows, values)
    if "embed_shape" in meta:  # absent when resuming a store begun before the embedding row existed
        _write_cells(store.embed, meta["embed_shape"], rows, embedded[:, None])


def _write_cells(path: Path, shape, rows: list[int], values) -> int:
    """values [batch, layers, positions, hidden] into rows of the [layers, positions, samples, hidden] float16
    file at path, a float16 copy at a time; returns how many values were beyond float16's range (clipped).
    Each cell's rows go by one write per run of consecutive rows: a batch's rows are scattered over the file."""
    import os

    import numpy as np

    if values.dtype == np.float16:  # recorded in float16: a value beyond its range became inf
        clipped = int(np.isinf(values).sum())
        values = np.clip(values, -FLOAT16_MAX, FLOAT16_MAX) if clipped else values
    else:
        clipped = int((values > FLOAT16_MAX).sum() + (values < -FLOAT16_MAX).sum())
        values = np.clip(values, -FLOAT16_MAX, FLOAT16_MAX, out=np.empty(values.shape, np.float16),
                         casting="same_kind")
    layers, positions, samples, hidden = shape
    order = np.argsort(rows, kind="stable")
    rows = np.asarray(rows)[order]
    runs = np.split(np.arange(len(rows)), np.flatnonzero(np.diff(rows) != 1) + 1)  # consecutive rows
    row_bytes = hidden * 2
    fd = os.open(path, os.O_WRONLY)
    try:
        with space_for(path):  # the file is sparse until written: a full disk shows here
            for layer in range(layers):
                for position in range(positions):
                    cell = values[order, layer, position]  # [batch, hidden], in file order
                    start = (layer * positions + position) * samples
                    for run in runs:
                        os.pwrite(fd, cell[run[0] : run[-1] + 1].tobytes(), (start + int(rows[run[0]])) * row_bytes)
    finally:
        os.close(fd)
    return clipped


def write_answer_cells(lm, directory: Path, meta: dict, frame, rows: list[int], recording=None) -> None:
    """The cells of one generated batch, as soon as it is located: frame is label.label_and_locate's (prompt_ids,
    answer_ids, the positions), row k decoded as row k of `recording` (sites.record); rows[k] is its store row.

    Answers read back from the checkpoints of an earlier run have no recording: a forward pass over them reads
    their cells, as extract_activations does. Rows already written are skipped (the same answers give the same
    cells), and meta.json lists the rows written until every row is, so a killed run resumes with nothing mixed.
    """
    import numpy as np

    directory = Path(directory)
    done = rows_written(meta)
    keep = [k for k, row in enumerate(rows) if row not in done]
    if not keep:
        return
    prompts = [list(frame["prompt_ids"].iloc[k]) for k in keep]
    sequences = [p + list(frame["answer_ids"].iloc[k]) for p, k in zip(prompts, keep)]
    positions = np.stack([frame[position_column(p)].to_numpy()[keep] for p in POSITIONS], axis=1)  # [batch, 15]
    if recording is None:
        values = read_positions(lm, sequences, positions, meta["site"])
    else:  # -1 (no exact answer) reads the first token, as read_positions does
        values = np.stack([recording.cells(k, len(p), np.maximum(at, 0).tolist()).numpy()
                           for k, p, at in zip(keep, prompts, positions)])  # [batch, layers, 15, hidden], as recorded
    write_rows(directory, meta, [rows[k] for k in keep], values, read_embeddings(lm, sequences, positions))
    mark_written(directory, meta, [rows[k] for k in keep])


def rows_written(meta: dict) -> set[int]:
    """The store rows written so far, by a stage that writes rows in any order (meta.json's rows_written)."""
    n_samples = meta["shape"][2]
    return set(range(n_samples)) if meta["written"] == n_samples else set(meta.get("rows_written", []))


def mark_written(directory: Path, meta: dict, rows: list[int]) -> None:
    """Add rows to meta.json's rows written; the list goes once every row is written (then `written` says it)."""
    meta["rows_written"] = sorted(rows_written(meta) | set(rows))
    meta["written"] = len(meta["rows_written"])
    if meta["written"] == meta["shape"][2]:
        del meta["rows_written"]
    write_json(Store(directory).meta, meta)


def check_resume(directory: Path, run_settings: dict | None, site: str, model_dtype: str, device: str) -> None:
    """Refuse, before the model loads, to finish a store begun with other settings (a mixed store looks fine).
    run_settings None: not known yet (generation adds stop_text once the model is loaded); not compared."""
    store = Store(directory)
    if store.meta.exists() and store.acts.exists():
        wanted = store_meta(run_settings, site, 0, 0, 0, model_dtype, device)
        keys = [k for k in RESUME_KEYS if run_settings is not None or k != "answers"]
        check_matches(read_json(store.meta, META_FIX), {k: wanted[k] for k in keys}, directory)


def read_positions(lm, sequences: list[list[int]], positions, site: str):
    """One forward pass over a batch of token sequences: [batch, layers, k, hidden] float32 at positions [batch, k]
    (indices into each unpadded sequence). Negative positions (no exact answer) read the first real token."""
    from truthmap.lm.sites import read_cells

    return read_cells(lm, sequences, positions, site).float().numpy()


def read_embeddings(lm, sequences: list[list[int]], positions):
    """[batch, k, width] float32: the input embedding module's output for the tokens at positions [batch, k]
    (indices into each unpadded sequence; negative ones read the first token, as read_positions). A lookup, no
    forward pass: the embedding of a token does not depend on its context."""
    import numpy as np
    import torch

    positions = np.maximum(np.asarray(positions), 0)  # [batch, k]
    ids = torch.tensor([[seq[p] for p in row] for seq, row in zip(sequences, positions)], dtype=torch.long)
    embedding = lm.model.get_input_embeddings()
    with torch.inference_mode():
        return embedding(ids.to(embedding.weight.device)).float().cpu().numpy()  # [batch, k, width]


def open_embedding(directory: Path, meta: dict):
    """The input-embedding store of a finished store (a CellStore with one layer), or None for a store made before
    it existed."""
    if "embed_shape" not in meta:
        return None
    return CellStore(Store(directory).embed, meta["embed_shape"])


def open_store(directory: Path):
    """The finished store as a CellStore ([samples, layers, positions, hidden] float16), and its meta."""
    directory = Path(directory)
    meta_path = Store(directory).meta
    if not meta_path.exists():
        raise StoreError(f"No activations in {directory}. Run `truthmap extract` first.")
    meta = read_json(meta_path, META_FIX)
    if meta["written"] != meta["shape"][2]:
        raise StoreError(
            f"Activations in {directory} are incomplete ({meta['written']} of {meta['shape'][2]} samples). "
            "Rerun `truthmap extract` to finish them."
        )
    return CellStore(Store(directory).acts, meta["shape"]), meta


class CellStore:
    """A store file [layers, positions, samples, hidden], read as [samples, layers, positions, hidden] one
    (layer, position) cell at a time: acts[:, layer, position, :] is a plain read of that cell's bytes into a new
    [samples, hidden] float16 array. np.asarray(acts) reads the whole store (small stores, tests)."""

    def __init__(self, path: Path, file_shape):
        self.path = Path(path)
        self.file_shape = tuple(int(x) for x in file_shape)
        layers, positions, samples, hidden = self.file_shape
        self.shape = (samples, layers, positions, hidden)
        self.ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def cell(self, layer: int, position: int):
        import numpy as np

        layers, positions, samples, hidden = self.file_shape
        layer, position = range(layers)[layer], range(positions)[position]  # negative indices, IndexError
        out = np.empty((samples, hidden), dtype=np.float16)
        with open(self.path, "rb") as f:
            f.seek((layer * positions + position) * out.nbytes)
            if f.readinto(out) != out.nbytes:
                raise StoreError(f"{self.path} is shorter than its meta.json says; extract the activations again.")
        return out

    def __getitem__(self, key):
        import numbers

        whole = slice(None)
        if isinstance(key, tuple) and len(key) == 4 and key[0] == whole and key[3] == whole:
            if isinstance(key[1], numbers.Integral) and isinstance(key[2], numbers.Integral):
                return self.cell(int(key[1]), int(key[2]))
        raise IndexError(f"A CellStore is read one cell at a time, acts[:, layer, position, :]; got {key!r}.")

    def __array__(self, dtype=None, copy=None):
        import numpy as np

        whole = np.fromfile(self.path, dtype=np.float16).reshape(self.file_shape).transpose(2, 0, 1, 3)
        return whole if dtype is None else whole.astype(dtype)


class RowView:
    """A [samples, layers, positions, hidden] store restricted to some rows, read one cell at a time."""

    def __init__(self, acts, rows):
        self.acts, self.rows = acts, rows
        self.shape = (len(rows),) + tuple(acts.shape[1:])

    def __getitem__(self, key):
        import numpy as np

        return np.asarray(self.acts[key])[self.rows]


def merge_stores(parts: list[tuple[list[int], Path]], directory: Path, n_samples: int) -> None:
    """Copy each shard's store into the run's store at its rows; meta.json is written last, so a killed merge
    never leaves a store that looks finished."""
    import numpy as np

    metas = [read_json(Store(d).meta) for _, d in parts]
    n_layers, n_positions, _, hidden = metas[0]["shape"]
    meta = metas[0] | {"shape": [n_layers, n_positions, n_samples, hidden], "written": n_samples,
                       "clipped": sum(m["clipped"] for m in metas)}
    files = [("acts", "shape")]  # Store attribute, meta key of its shape
    if all("embed_shape" in m for m in metas):  # the input embedding, beside the store (see activations.py)
        meta["embed_shape"] = metas[0]["embed_shape"][:2] + [n_samples, metas[0]["embed_shape"][3]]
        files.append(("embed", "embed_shape"))
    else:
        meta.pop("embed_shape", None)
    directory.mkdir(parents=True, exist_ok=True)
    check_space(directory, meta)  # a full disk under a mapping is a SIGBUS, not an error that names the file
    store_files = Store(directory)
    store_files.meta.unlink(missing_ok=True)
    for name, key in files:
        np.memmap(getattr(store_files, name), dtype=np.float16, mode="w+", shape=tuple(meta[key])).flush()
        for (rows, part_dir), part_meta in zip(parts, metas):
            for layer in range(meta[key][0]):  # one layer of one shard mapped at a time (see activations.py)
                store = np.memmap(getattr(store_files, name), dtype=np.float16, mode="r+", shape=tuple(meta[key]))
                part = np.memmap(getattr(Store(part_dir), name), dtype=np.float16, mode="r", shape=tuple(part_meta[key]))
                store[layer][:, rows, :] = part[layer]  # [positions, shard samples, hidden]
                store.flush()
                del store, part
    write_json(store_files.meta, meta)
