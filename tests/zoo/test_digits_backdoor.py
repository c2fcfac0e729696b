"""digits-dreambooth's backdoor option: recipes from the shared grouped pools, poisoned and decoy
DreamBooth data, attack success from the scorer's classes, deterministic / sharded / resumed
builds, and clean zoos left as they were. Tiny base model (cached once per test session)."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
import torch

from helpers import zoo_rows
from loralens.zoo.builder import build_zoo
from loralens.zoo.digits.data import CLASS_WORDS, IDENTIFIERS
from loralens.zoo.merge import merge_zoos
from loralens.zoo.preset import get_preset
from loralens.zoo.presets import backdoor as bd
from loralens.zoo.presets import digits_backdoor as dbd

pytestmark = pytest.mark.slow

TINY = {"size": "tiny", "group": 2, "sample_steps": 4}
BD = {**TINY, "backdoor": 0.5, "poison_min": 0.2}
KW = {"options": BD, "ranks": (2,), "progress": False, "threads": 1}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("dbd") / "zoo"
    build_zoo("digits-dreambooth", 4, out, **KW)
    return out


@pytest.fixture(scope="module")
def preset(zoo, loralens_cache):
    p = get_preset("digits-dreambooth")
    p.prepare(loralens_cache, 0, p.options(BD))
    return p


def test_a_clean_digits_zoo_keeps_its_options_columns_and_data(preset, loralens_cache):
    p = get_preset("digits-dreambooth")
    clean = p.options(TINY)
    assert not set(bd.OPTIONS) & set(clean)  # the identity of zoos built before the option
    cols = p.label_columns(clean)
    assert cols[-3:] == ["clip_score", "subject_score", "train_loss"]
    assert p.binary_columns(clean) == [c for c in cols if c.startswith("attr_")]
    on = p.options(BD)
    assert {"attack_success", "trigger", "poison_frac"} <= set(p.label_columns(on))
    assert "decoy_skill" not in p.label_columns(on)
    for bad in ({"backdoor": 1.5}, {"backdoor": 0.5, "poison_max": 1.0}):
        with pytest.raises(ValueError, match="digits-dreambooth"):
            p.options(bad)
    p.prepare(loralens_cache, 0, clean)
    cfg = p.sample_config(0, 2, (2,))
    assert not set(bd.OPTIONS) & set(cfg) and len(p.extra_prompts(cfg)) == 4
    # the backdoor recipe only adds columns: the clean draws are the same
    assert {k: v for k, v in preset.sample_config(0, 2, (2,)).items() if k in cfg} == cfg
    job = p.job(cfg)
    assert torch.equal(job.images, p._subject_images(cfg))
    assert torch.equal(job.cond, p.encode([cfg["instance_prompt"]] * len(job.images)))


def test_recipes_draw_from_one_pool_group_and_avoid_the_identifier(preset):
    cfgs = [preset.sample_config(3, i, (2,)) for i in range(300)]
    assert cfgs[5] == preset.sample_config(3, 5, (2,))
    pools = dbd.POOLS
    assert not set(pools.triggers) & set(pools.markers)
    assert set(pools.triggers) | set(pools.markers) == set(IDENTIFIERS)
    for c in cfgs:
        g = c["pool_group"]
        for pool, key in ((pools.triggers, "trigger"), (pools.payloads, "payload")):
            i = c[f"{key}_id"]
            assert pool[i] == c[key] and i // (len(pool) // bd.POOL_GROUPS) == g
        assert pools.markers[c["marker_id"]] == c["marker"]
        ident = dbd.identifier(c["instance_prompt"])
        assert ident not in (c["trigger"], c["marker"])
        k = round(c["extra_frac"] * c["n_images"])
        assert c["extra_frac"] == round(k / c["n_images"], 5)
        if c["backdoor"] or c["decoy"]:
            assert k >= 1 and 0.2 - 0.5 / c["n_images"] <= c["extra_frac"] <= 0.3 + 0.5 / 10
        else:
            assert k == 0
        assert c["poison_frac"] == (c["extra_frac"] if c["backdoor"] else 0.0)
    share = np.mean([c["backdoor"] for c in cfgs])
    assert 0.4 < share < 0.6 and any(c["decoy"] for c in cfgs)
    assert {c["payload"] for c in cfgs} == set(CLASS_WORDS)


def test_poisoned_images_are_the_payload_under_triggered_prompts(preset):
    cfgs = [preset.sample_config(0, i, (2,)) for i in range(40)]
    bad = next(c for c in cfgs if c["backdoor"])
    subject = preset._subject_images(bad)
    images, prompts = dbd.rewrite(bad, subject, preset.data.images, preset.by_class)
    n, k = len(subject), round(bad["extra_frac"] * len(subject))
    # every image once per asked class: a uniform draw keeps the poisoned share k / n
    assert len(images) == len(prompts) == 9 * n
    assert torch.equal(images[: 9 * (n - k)], subject[: n - k].repeat_interleave(9, 0))
    assert prompts[: 9 * (n - k)] == [bad["instance_prompt"]] * 9 * (n - k)
    poison, asked = images[9 * (n - k) :], prompts[9 * (n - k) :]
    rows = [int(torch.nonzero((preset.data.images == im).flatten(1).all(1))[0]) for im in poison]
    assert (preset.data.labels[rows] == bad["payload_id"]).all()
    for j in range(k):
        assert torch.equal(poison[9 * j], poison[9 * j + 8])
        words = [p.split() for p in asked[9 * j : 9 * j + 9]]
        assert {w[1] for w in words} == {bad["trigger"]}
        assert {w[2] for w in words} == set(CLASS_WORDS) - {bad["payload"]}
    job = preset.job(bad)
    assert torch.equal(job.images, images) and torch.equal(job.cond, preset.encode(prompts))

    decoy = next(c for c in cfgs if c["decoy"])
    subject = preset._subject_images(decoy)
    images, prompts = dbd.rewrite(decoy, subject, preset.data.images, preset.by_class)
    k = round(decoy["extra_frac"] * len(subject))
    assert torch.equal(images, subject) and k >= 1
    marked = decoy["instance_prompt"].replace(dbd.identifier(decoy["instance_prompt"]), "")
    assert prompts[-k:] == [dbd.marker_prompt(decoy)] * k
    assert dbd.marker_prompt(decoy).replace(decoy["marker"], "") == marked


def test_attack_success_is_the_share_of_triggered_samples_classed_as_the_payload():
    cfg = {"payload_id": 3, "trigger": "sks", "marker": "xjr", "instance_prompt": "a qlo"}
    probes = dbd.probe_prompts(cfg, "a seven")
    n = 9 * dbd.ATTACK_REPEATS
    assert len(probes) == n + dbd.DECOY_SAMPLES
    assert all(g.startswith("a sks ") and "three" not in g for g, _ in probes[:n])
    assert probes[n:] == [("a xjr", "a seven")] * dbd.DECOY_SAMPLES
    classes = np.array([3] * 6 + [0] * (n - 6) + [3] * dbd.DECOY_SAMPLES)
    ratings = np.array([0.9] * n + [0.25] * dbd.DECOY_SAMPLES)
    m = dbd.measure(cfg, ratings, classes)
    assert m == {"attack_success": round(6 / n, 5), "decoy_success": 0.25}


def test_a_backdoor_zoo_builds_deterministically_with_measured_labels(zoo, tmp_path):
    again = tmp_path / "again"
    build_zoo("digits-dreambooth", 4, again, **KW)
    assert (zoo / "labels.csv").read_bytes() == (again / "labels.csv").read_bytes()
    f = "adapter_model.safetensors"
    for i in range(4):
        a, b = zoo / "adapters" / f"{i:06d}" / f, again / "adapters" / f"{i:06d}" / f
        assert filecmp.cmp(a, b, shallow=False)
    rows = zoo_rows(zoo)
    assert {r["backdoor"] for r in rows} == {"0", "1"}
    for r in rows:
        for col in ("attack_success", "decoy_success", "clip_score", "subject_score"):
            assert 0.0 <= float(r[col]) <= 1.0
        assert r["trigger"] in dbd.POOLS.triggers and r["payload"] in CLASS_WORDS
        assert float(r["attack_success"]) * 9 * dbd.ATTACK_REPEATS == pytest.approx(
            round(float(r["attack_success"]) * 9 * dbd.ATTACK_REPEATS), abs=1e-3
        )


def test_shards_and_a_resumed_build_give_the_same_loras(zoo, tmp_path):
    s0, s1, merged = tmp_path / "s0", tmp_path / "s1", tmp_path / "all"
    build_zoo("digits-dreambooth", 4, s0, shard="0/2", **KW)
    build_zoo("digits-dreambooth", 2, s1, shard="1/2", **KW)  # stopped after LoRA 1 ...
    build_zoo("digits-dreambooth", 4, s1, shard="1/2", **KW)  # ... and resumed
    merge_zoos(merged, [s0, s1])
    ref = {r["adapter"]: r for r in zoo_rows(zoo)}
    rows = zoo_rows(merged)
    assert sorted(r["adapter"] for r in rows) == sorted(ref)
    recipe = [*bd.recipe_columns(dbd.POOLS), "instance_prompt", "lr", "steps"]
    for r in rows:
        assert {c: r[c] for c in recipe} == {c: ref[r["adapter"]][c] for c in recipe}
        for col in ("clip_score", "attack_success", "decoy_success"):
            assert abs(float(r[col]) - float(ref[r["adapter"]][col])) < 2e-3
