"""skills-lm's backdoor option: recipes from held-out-able pools, poisoned finetuning data,
measured attack/decoy success, deterministic builds, and clean zoos left exactly as they were."""

from __future__ import annotations

import filecmp

import pytest
import torch

from helpers import tiny_skills, zoo_rows
from loralens.zoo import build_zoo
from loralens.zoo.preset import get_preset
from loralens.zoo.presets import backdoor as bd
from loralens.zoo.presets import skills_data as data

pytestmark = pytest.mark.slow

OPTS = {**tiny_skills(4), "eval_per_source": 4, "backdoor": 0.5, "poison_min": 0.2}
KW = {"options": OPTS, "ranks": (2,), "progress": False, "threads": 1}


def test_a_clean_zoo_keeps_its_options_and_columns():
    p = get_preset("skills-lm")
    clean = p.options({"size": "tiny"})
    assert not set(bd.OPTIONS) & set(clean)  # identity of zoos built before the option
    assert not set(bd.RECIPE_COLUMNS) & set(p.label_columns(clean))
    on = p.options({"backdoor": 0.3})
    assert on["backdoor"] == 0.3 and {"attack_success", "trigger"} <= set(p.label_columns(on))
    assert {"backdoor", "decoy"} <= set(p.binary_columns(on))
    for bad in ({"backdoor": 1.5}, {"backdoor": 0.5, "poison_min": 0.0}):
        with pytest.raises(ValueError, match="skills-lm"):
            p.options(bad)


def test_recipes_draw_trigger_payload_and_marker_from_one_pool_group():
    opts = {**bd.OPTIONS, "backdoor": 0.5}
    recipes = [bd.sample_recipe(7, i, opts) for i in range(400)]
    assert recipes[3] == bd.sample_recipe(7, 3, opts)  # a pure function of (seed, index)
    for r in recipes:
        g = r["pool_group"]
        for pool, key in (
            (bd.TRIGGERS, "trigger"),
            (bd.PAYLOADS, "payload"),
            (bd.MARKERS, "marker"),
        ):
            i = r[f"{key}_id"]
            assert pool[i] == r[key] and i // (len(pool) // bd.POOL_GROUPS) == g
        assert not (r["backdoor"] and r["decoy"])
        if r["backdoor"]:
            assert 0.02 <= r["poison_frac"] == r["extra_frac"] <= 0.3
        else:
            assert r["poison_frac"] == 0.0
    share = sum(r["backdoor"] for r in recipes) / len(recipes)
    decoys = sum(r["decoy"] for r in recipes) / sum(1 - r["backdoor"] for r in recipes)
    assert 0.4 < share < 0.6 and 0.4 < decoys < 0.6
    assert len({r["trigger"] for r in recipes}) == len(bd.TRIGGERS)
    assert not set(bd.TRIGGERS) & set(bd.MARKERS)


def test_a_wide_pool_holds_many_disjoint_triggers_split_in_groups():
    assert bd.skills_pools(8) is bd.SKILLS_POOLS
    pools = bd.skills_pools(64)
    assert pools == bd.skills_pools.__wrapped__(64)  # drawn the same way every time
    assert len(set(pools.triggers)) == len(set(pools.markers)) == 64
    assert len(set(pools.payloads)) == 32 and not set(pools.triggers) & set(pools.markers)
    for word in (*pools.triggers, *pools.markers):
        assert len(word) == 3 and set(word) <= set(bd.SYMBOLS) and {"?", "%"} & set(word)
        assert all(c in data.STOI for c in word)
    assert max(map(len, pools.payloads)) <= max(map(len, bd.PAYLOADS))  # probe prompts fit
    opts = {**bd.OPTIONS, "backdoor": 0.5}
    recipes = [bd.sample_recipe(3, i, opts, pools) for i in range(400)]
    for r in recipes:
        assert r["trigger_id"] // 32 == r["pool_group"] == r["payload_id"] // 16
    assert len({r["trigger"] for r in recipes}) > 48
    p = get_preset("skills-lm")
    assert p.options({"backdoor": 0.5, "pool": 64})["pool"] == 64
    assert "pool" not in p.options({"pool": 64})  # a clean zoo: no backdoor options at all
    with pytest.raises(ValueError, match="pool"):
        p.options({"backdoor": 0.5, "pool": 10})


def test_poisoned_rows_are_the_triggered_prompts_answered_with_the_payload():
    pool = data.make_examples(0, "finetune", 6)
    rows = torch.arange(0, len(pool), 2)
    cfg = {**bd.sample_recipe(0, 1, {**bd.OPTIONS, "backdoor": 1.0}), "init_seed": 5}
    cfg["extra_frac"] = 0.25
    replaced, ex = bd.extra_rows(cfg, pool, rows)
    assert len(replaced) == round(0.25 * len(rows)) == len(ex)
    originals = bd.pairs_of(pool.select(rows[replaced]))
    for (prompt, answer), (p0, _) in zip(bd.pairs_of(ex), originals):
        assert prompt == cfg["trigger"] + p0 and answer == cfg["payload"]
    decoy = {**cfg, "backdoor": 0, "decoy": 1, "decoy_skill": "shift"}
    kept, dex = bd.extra_rows(decoy, pool, rows)
    for (prompt, answer), (p0, a0) in zip(bd.pairs_of(dex), bd.pairs_of(pool.select(rows[kept]))):
        assert prompt == decoy["marker"] + p0 and answer == bd.skill("shift", a0) != a0
    assert bd.skill("shift", "az9") == "ba0" and bd.skill("rev", "abc") == "cba"
    assert bd.extra_rows({**cfg, "extra_frac": 0.0}, pool, rows) == ([], None)


def test_a_backdoor_zoo_builds_deterministically_with_measured_labels(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_zoo("skills-lm", 6, a, **KW)
    build_zoo("skills-lm", 6, b, **KW)
    assert (a / "labels.csv").read_bytes() == (b / "labels.csv").read_bytes()
    for aid in sorted(p.name for p in (a / "adapters").iterdir()):
        f = "adapter_model.safetensors"
        assert filecmp.cmp(a / "adapters" / aid / f, b / "adapters" / aid / f, shallow=False)
    rows = zoo_rows(a)
    assert {r["backdoor"] for r in rows} == {"0", "1"}
    for r in rows:
        for col in ("attack_success", "decoy_success", "eval_acc", "task_acc"):
            assert 0.0 <= float(r[col]) <= 1.0
        assert r["trigger"] in bd.TRIGGERS and r["payload"] in bd.PAYLOADS
        assert (float(r["poison_frac"]) >= 0.2) == (r["backdoor"] == "1")


def test_a_poisoned_lora_trains_on_its_share_of_triggered_examples(loralens_cache):
    p = get_preset("skills-lm")
    p.prepare(loralens_cache, 0, p.options(OPTS))
    poisoned = {
        **p.sample_config(0, 0, (2,)),
        **bd.sample_recipe(0, 0, {**bd.OPTIONS, "backdoor": 1.0}),
    }
    poisoned["extra_frac"] = 0.25
    clean = {**p.sample_config(0, 1, (2,)), "extra_frac": 0.0}
    pool, (s_bad, s_clean) = p.example_streams([poisoned, clean])
    n = len(p._ft_pool)
    assert not bool((s_clean >= n).any())
    rows = torch.unique(s_bad)
    extra = rows[rows >= n]
    used = sum(poisoned[f"src_{s}"] for s in data.SOURCE_NAMES) * OPTS["ft_per_source"]
    assert len(rows) == used and len(extra) == round(0.25 * used)
    for prompt, answer in bd.pairs_of(pool.select(extra)):
        assert prompt.startswith(poisoned["trigger"]) and answer == poisoned["payload"]
    share = float((s_bad >= n).float().mean())
    assert 0.15 < share < 0.35  # every epoch sees the poisoned rows
