"""The sharded checkpoint format, on one process: the reader against torch's own slicing for any
source and target split, only the needed bytes read, the manifest as the completeness marker,
damaged shards named, the unsharded format read through the same reader, streaming export."""
import json
import os
import random

import pytest
import torch

import megasink
from megasink import checkpoint as ck
from megasink import safetensors_io as stio


def _pieces_of(full: torch.Tensor, dim, parts: int, owners: int, rng: random.Random):
    """Cut ``full`` as a sharded save would: TP parts along ``dim`` (None: one part), each part's
    flat elements split into ``owners`` ranges at random points -> [(part, part_shape, start, 1-D values)]."""
    chunks = [full] if dim is None else list(full.chunk(parts, dim=dim))
    out = []
    for j, chunk in enumerate(chunks):
        flat = chunk.contiguous().view(-1)
        cuts = sorted(rng.randint(0, flat.numel()) for _ in range(owners - 1))
        for a, b in zip([0, *cuts], [*cuts, flat.numel()]):
            if b > a:
                out.append((j, list(chunk.shape), a, flat[a:b]))
    return out


def write_sharded(d, tensors: dict, split: dict, parts: int = 2, owners: int = 3, seed: int = 0, state=None,
                  cfg=None):
    """A sharded checkpoint directory ``d`` holding ``tensors`` ({(kind, name): full tensor}), each split
    along ``split[name]`` (None: not split) into ``parts`` TP parts, each spread over ``owners`` ranks."""
    rng = random.Random(seed)
    d.mkdir(parents=True)
    world = parts * owners
    files = {r: {} for r in range(world)}
    reports = [{"files": {}, "pieces": []} for _ in range(world)]
    for (kind, name), full in tensors.items():
        dim = split.get(name)
        for j, shape, start, values in _pieces_of(full, dim, parts, owners, rng):
            r = rng.randrange(world)
            fname = ck.shard_file("model" if kind == "model" else "optim", r, world)
            key = f"{kind}/{name}@{j}:{start}"
            files[r].setdefault(fname, {})[key] = values
            reports[r]["pieces"].append({
                "kind": kind, "name": name, "dtype": stio.DTYPES[full.dtype], "part_shape": shape, "dim": dim,
                "parts": 1 if dim is None else parts, "part": j, "start": start, "numel": values.numel(),
                "file": fname, "key": key})
    for r in range(world):
        for fname, ts in files[r].items():
            reports[r]["files"][fname] = ck.save_tensors(d / fname, ts)
    if cfg is not None:
        megasink.config.save_config(cfg, d / "config.yaml")
    (d / "state.json").write_text(json.dumps(state or {"step": 1, "optimizer_step": 1, "world_size": 0}))
    manifest = ck.build_manifest(reports, 1, {"tp": parts, "pp": 1, "dp": owners, "zero": 1})
    (d / ck.MANIFEST).write_text(json.dumps(manifest))
    return manifest


SHAPES = {"w0": (12, 10), "w1": (6, 8, 4), "b": (12,), "s": ()}


@pytest.mark.parametrize("src_parts", [1, 2, 3])
def test_reader_reads_any_range_of_any_part_and_only_its_bytes(tmp_path, src_parts, monkeypatch):
    torch.manual_seed(src_parts)
    full = {name: torch.randn(shape) for name, shape in SHAPES.items()}
    dims = {"w0": 1, "w1": 1, "b": 0, "s": None}  # the dimension each is split along under TP
    split = {k: (v if src_parts > 1 else None) for k, v in dims.items()}
    write_sharded(tmp_path / "c", {("model", k): v for k, v in full.items()}, split, parts=src_parts,
                  state={"step": 1, "world_size": 0}, cfg=megasink.load_config("configs/tiny-sink.yaml"))
    assert ck.checkpoint_problem(tmp_path / "c") is None
    read_bytes = []
    real = stio.read_range
    monkeypatch.setattr(stio, "read_range", lambda f, e, s, lo, out: (read_bytes.append(out.numel() * 4),
                                                                       real(f, e, s, lo, out))[1])
    rng = random.Random(1)
    with ck.CheckpointReader(tmp_path / "c") as r:
        for name, t in full.items():
            assert torch.equal(r.read_full(name), t)
            for parts in (1, 2, 4):
                dim = dims[name]
                if dim is not None and t.shape[dim] % parts:
                    continue
                for part in range(parts):
                    want = (t if dim is None else t.chunk(parts, dim=dim)[part]).reshape(-1)
                    lo = rng.randint(0, want.numel())
                    hi = rng.randint(lo, want.numel())
                    read_bytes.clear()
                    got = r.read(name, "model", (dim, parts, part), lo, hi)
                    assert torch.equal(got, want[lo:hi]), (name, parts, part, lo, hi)
                    assert sum(read_bytes) == (hi - lo) * 4  # the bytes of [lo, hi) and nothing else
                    assert r.shape(name, split=(dim, parts, part)) == tuple((t if dim is None else
                                                                             t.chunk(parts, dim=dim)[part]).shape)


def test_rank_files_are_plain_safetensors(tmp_path):
    from safetensors.torch import load_file

    w = torch.randn(6, 4)
    manifest = write_sharded(tmp_path / "c", {("model", "w"): w, ("exp_avg", "w"): w * 2}, {"w": 0})
    for fname in manifest["files"]:
        for key, v in load_file(str(tmp_path / "c" / fname)).items():
            kind, rest = key.split("/", 1)
            name, where = rest.split("@")
            part, start = map(int, where.split(":"))
            source = w if kind == "model" else w * 2
            assert torch.equal(v, source.chunk(2, dim=0)[part].reshape(-1)[start:start + v.numel()])


def test_unsharded_checkpoint_reads_through_the_same_reader(tmp_path):
    cfg = megasink.load_config("configs/tiny-gated.yaml", ["model.n_layers=2"])
    model = megasink.build_model(cfg.model)
    sd = ck.full_state_dict(model)
    optim = {f"exp_avg/{k}": v * 3 for k, v in sd.items()}
    ck.write_checkpoint_dir(tmp_path / "step_1", cfg, sd, optim, {"step": 1, "optimizer_step": 1})
    with ck.CheckpointReader(tmp_path / "step_1") as r:
        assert not r.sharded and set(r.names()) == set(sd)
        w = sd["layers.0.attention.wo.weight"]
        assert torch.equal(r.read("layers.0.attention.wo.weight", "model", (1, 2, 1), 3, 40),
                           w.chunk(2, dim=1)[1].reshape(-1)[3:40])
        assert torch.equal(r.read_full("layers.1.feed_forward.w1.weight", "exp_avg"),
                           optim["exp_avg/layers.1.feed_forward.w1.weight"])
    assert ck.load_optim_tensors(tmp_path / "step_1").keys() == optim.keys()


def _sharded_run(root, steps=(2, 4)):
    """Sharded training-style checkpoints at ``steps`` under checkpoints/ ``root``; latest = the last."""
    cfg = megasink.load_config("configs/tiny-gated.yaml", ["model.n_layers=2"])
    sd = ck.full_state_dict(megasink.build_model(cfg.model))
    tensors = {("model", k): v for k, v in sd.items()}
    tensors.update({(m, k): v * 0.5 for k, v in sd.items() for m in ck.MOMENTS})
    split = {k: (0 if v.dim() == 2 else None) for k, v in sd.items()}
    for step in steps:
        write_sharded(root / f"step_{step}", tensors, split, cfg=cfg,
                      state={"step": step, "optimizer_step": step, "world_size": 0, "layout": {"tp": 2, "pp": 1}})
        ck.update_latest(root, f"step_{step}")
    return sd


def _manifest_pieces_gap(d):
    m = json.loads((d / ck.MANIFEST).read_text())
    entry = m["tensors"]["exp_avg"]["layers.0.attention.wq.weight"]
    entry["pieces"] = entry["pieces"][1:]
    (d / ck.MANIFEST).write_text(json.dumps(m))


def _truncate_a_shard(d):
    f = sorted(d.glob("optim-rank*.safetensors"))[-1]
    f.write_bytes(f.read_bytes()[:-4])
    return f


def _rename_a_key(d):
    f = sorted(d.glob("optim-rank*.safetensors"))[0]
    data = f.read_bytes()
    f.write_bytes(data.replace(b"exp_avg_sq/", b"exp_avg_SQ/", 1))  # same size, header still parses


DAMAGE = {  # how -> (the file the error names, what it says)
    "no manifest": (lambda d: os.unlink(d / ck.MANIFEST), lambda d: d / ck.MANIFEST, "save did not finish"),
    "truncated shard": (_truncate_a_shard, lambda d: sorted(d.glob("optim-rank*"))[-1], "truncated or overwritten"),
    "missing shard": (lambda d: os.unlink(sorted(d.glob("model-rank*"))[0]), lambda d: sorted(d.glob("model-rank*"))[0],
                      "is missing"),
    "pieces leave a gap": (_manifest_pieces_gap, lambda d: d / ck.MANIFEST, "in no piece"),
    "a piece is not in its file": (_rename_a_key, lambda d: sorted(d.glob("optim-rank*"))[0],
                                   "do not belong together"),
    "manifest cut short": (lambda d: (d / ck.MANIFEST).write_text((d / ck.MANIFEST).read_text()[:-9]),
                           lambda d: d / ck.MANIFEST, "does not parse"),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_sharded_latest_is_named_and_resume_falls_back(tmp_path, how):
    root = tmp_path / "run" / "checkpoints"
    _sharded_run(root)
    d = root / "step_4"
    damage, named, says = DAMAGE[how]
    target = named(d)
    damage(d)
    with pytest.raises(ck.CheckpointError, match=f"{target}.*{says}"):
        ck.resolve_checkpoint_dir(d)
    with pytest.raises(ck.CheckpointError, match="names step_4.*newest complete checkpoint is .*step_2"):
        megasink.load_checkpoint(tmp_path / "run")
    choice, note = ck.resume_candidate(root)
    assert choice == root / "step_2" and str(target) in note
    ck.prune_checkpoints(root, keep_last=1)  # the damaged one never displaces a complete one
    assert ck.checkpoint_problem(root / "step_2") is None


def test_load_and_export_stream_from_a_sharded_checkpoint(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from megasink.hf import convert_checkpoint, mapping

    root = tmp_path / "run" / "checkpoints"
    sd = _sharded_run(root, steps=(2,))
    model, cfg = megasink.load_checkpoint(tmp_path / "run")
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    live, most = set(), [0]  # tensors read from the checkpoint and not yet freed
    real = ck.CheckpointReader.read_full

    def tracked(self, name, kind="model"):
        t = real(self, name, kind)
        live.add(id(t))
        most[0] = max(most[0], len(live))
        import weakref

        weakref.finalize(t, live.discard, id(t))
        return t

    monkeypatch.setattr(ck.CheckpointReader, "read_full", tracked)
    out = convert_checkpoint(tmp_path / "run", tmp_path / "hf", progress=False)
    # tensor by tensor: the one being written, plus a gated layer's wq and gate bias, which
    # mapping.to_hf_tensors keeps until its next layer (of 20 tensors here)
    assert most[0] <= 3 < len(sd) // 4
    exported = load_file(str(out / "model.safetensors"))
    want = dict(mapping.to_hf_tensors(sd, cfg.model))
    assert exported.keys() == want.keys() and all(torch.equal(exported[k], want[k]) for k in want)


def test_a_checkpoint_of_another_model_is_refused_before_export(tmp_path):
    from megasink.hf import convert_checkpoint

    root = tmp_path / "checkpoints"
    _sharded_run(root, steps=(2,))
    cfg = megasink.load_config("configs/tiny-gated.yaml", ["model.n_layers=3"])
    megasink.config.save_config(cfg, root / "step_2" / "config.yaml")
    with pytest.raises(ck.CheckpointError, match="does not match its config: missing .*layers.2"):
        convert_checkpoint(root / "step_2", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()
