"""The σ-MoE authors' sweep files, transcribed, and their translation into this toolkit's config keys.

Source: github RobertCsordas/moe, ``sweeps/{enwik8,small,big,smallbig}/*.yaml`` (the ``parameters`` of each
file, the keys that matter for a run; where a file lists several values, the one a run uses is chosen in
``PAPER_RUNS``), and the defaults of the keys a sweep leaves out (``main.py`` and
``tasks/simple/language_model/transformer_lm_mixin.py``: weight decay 0, Adam β (0.9, 0.999), no warmup,
expert dropout 0, MoE dropout mode "none", ``moe.init_scale`` 1). ``paper/moe.py`` and
``paper/moe_ablations.py`` name the sweeps behind the main table and the ablation table.
"""

from __future__ import annotations

ENWIK8 = {"state_size": 512, "transformer.encoder_n_layers": 12, "transformer.n_heads": 8, "dropout": 0.1,
          "lr": 0.00025, "batch_size": 32, "grad_clip": 0.25, "lm.unroll": 512, "stop_after": 100000,
          "lr_sched.type": "cos", "optimizer": "adamw", "test_interval": 2000}
SMALL = {"task": "wikitext103_sp_transformer",
         "state_size": 412, "transformer.encoder_n_layers": 16, "transformer.n_heads": 10,
         "transformer.head_projection_size": 41, "dropout": 0.1, "lr": 0.00025, "batch_size": 64,
         "lm.unroll": 256, "stop_after": 100000, "lr_sched.type": "cos", "optimizer": "adamw", "test_interval": 2000}
BIG = {"task": "wikitext103_sp_transformer",
       "state_size": 1024, "transformer.encoder_n_layers": 18, "transformer.n_heads": 16, "dropout": 0.2,
       "lr": 0.00025, "batch_size": 64, "grad_clip": 0.25, "lm.unroll": 512, "lr_warmup": 4000,
       "stop_after": 100000, "lr_sched.type": "cos", "optimizer": "adamw", "test_interval": 2000}
SIGMA_MOE = {"transformer.variant": "preln_moe", "moe.selection_mode": "sigmoid", "moe.reg_type": "entropy",
             "moe.perplexity_reg_mode": "global", "moe.norm_expert_sel_init": 1}
SWITCH = {"transformer.variant": "preln_moe", "moe.selection_mode": "gate", "moe.reg_type": "switch",
          "moe.perplexity_reg_mode": "global", "moe.perplexity_reg": 0.01, "moe.norm_expert_sel_init": 0,
          "moe.expert_size_init": 1, "moe.init_scale": 0.1}
ENWIK8_MOE = {**ENWIK8, **SIGMA_MOE, "moe.n_experts": 16, "moe.expert_size": 128, "pkm.n_heads": 4,
              "moe.perplexity_reg": 0.0001, "moe.drop_expert": 0.05}
PREFIX = "enwik8_moe_unshared_xl_nonshared_schedule_"

SWEEPS = {
    "enwik8/enwik8_baseline.yaml": {**ENWIK8, "transformer.variant": "preln_relative",
                                    "transformer.ff_multiplier": 4.01},
    "enwik8/enwik8_baseline_topk_nocomp.yaml": {**ENWIK8, "transformer.variant": "preln_topk",
                                                "transformer.ff_multiplier": 4.01,
                                                "transformer.topk_value": [128, 256, 512]},
    f"enwik8/{PREFIX}lowreg_exp_drop.yaml": ENWIK8_MOE,
    f"enwik8/{PREFIX}lowreg_dropout.yaml": {**ENWIK8_MOE, "moe.drop_expert": 0.0, "kvmem.dropout": "score"},
    f"enwik8/{PREFIX}lowreg_exp_drop_softmax.yaml": {**ENWIK8_MOE, "moe.selection_mode": "gate",
                                                     "moe.activation_after_topk": [0, 1]},
    f"enwik8/{PREFIX}lowreg_exp_drop_bad_init.yaml": {**ENWIK8_MOE, "moe.expert_size_init": 1},
    f"enwik8/{PREFIX}lowreg_no_exp_drop.yaml": {**ENWIK8_MOE, "moe.drop_expert": 0.0},
    f"enwik8/{PREFIX}lowreg_exp_drop_k2_256.yaml": {**ENWIK8_MOE, "moe.n_experts": 8, "moe.expert_size": 256,
                                                    "pkm.n_heads": 2},
    f"enwik8/{PREFIX}lowreg_exp_drop_k1_es512.yaml": {**ENWIK8_MOE, "moe.n_experts": 4, "moe.expert_size": 512,
                                                      "pkm.n_heads": 1},
    f"enwik8/{PREFIX}lowreg_exp_switch_es512_fixreg_init.yaml": {
        **ENWIK8, **SWITCH, "moe.n_experts": 4, "moe.expert_size": 512, "pkm.n_heads": 1,
        "kvmem.dropout": ["none", "score"]},
    f"enwik8/{PREFIX}lowreg_exp_switch_es128_fixreg_init.yaml": {
        **ENWIK8, **SWITCH, "moe.n_experts": 16, "moe.expert_size": 128, "pkm.n_heads": 1,
        "kvmem.dropout": ["none", "score"]},
    f"enwik8/{PREFIX}lowreg_exp_switch_h4.yaml": {**ENWIK8, **SWITCH, "moe.n_experts": 16, "moe.expert_size": 128,
                                                  "pkm.n_heads": 4, "kvmem.dropout": "none"},
    f"enwik8/{PREFIX}lowreg_exp_drop_sinkmoid2.yaml": {**ENWIK8_MOE, "moe.selection_mode": "sinkmoid2",
                                                       "moe.perplexity_reg": [0.0001, 0]},
    f"enwik8/{PREFIX}lowreg_exp_drop_sinkmoid2_h1.yaml": {**ENWIK8_MOE, "moe.selection_mode": "sinkmoid2",
                                                          "moe.n_experts": 4, "moe.expert_size": 512, "pkm.n_heads": 1},
    f"enwik8/{PREFIX}lowreg_exp_drop_k.yaml": {**ENWIK8_MOE, "pkm.n_heads": [1, 2, 8]},
    f"enwik8/{PREFIX}lowreg_exp_drop_2x_64.yaml": {**ENWIK8_MOE, "moe.n_experts": 32, "moe.expert_size": 64},
    f"enwik8/{PREFIX}lowreg_exp_drop_nopplreg.yaml": {**ENWIK8_MOE, "moe.perplexity_reg": 0.0},
    "enwik8/enwik8_pkm_matched.yaml": {**ENWIK8, "transformer.variant": "preln_kvmem", "pkm.n_keys": 62,
                                       "pkm.n_heads": 4, "pkm.knn": 128, "transformer.activation": ["softmax", "relu"]},
    "enwik8/enwik8_pkm_matched_init.yaml": {**ENWIK8, "transformer.variant": "preln_kvmem", "pkm.n_keys": 62,
                                            "pkm.n_heads": 4, "pkm.knn": 128, "transformer.activation": "relu",
                                            "pkm.custom_init": 5},
    "small/wikitext103_small_xl_nonshared_schedule_short_matched.yaml": {
        **SMALL, "transformer.variant": "preln_relative", "transformer.ff_multiplier": 4.985, "grad_clip": 0.1},
    "small/wikitext103_small_moe_unshared_xl_nonshared_schedule_short_128.yaml": {
        **SMALL, **SIGMA_MOE, "grad_clip": 0.25, "moe.n_experts": 16, "moe.expert_size": 128, "pkm.n_heads": 4,
        "moe.perplexity_reg": 0.001},
    "big/wikitext103_baseline_big.yaml": {**BIG, "transformer.variant": "preln_relative",
                                          "transformer.ff_multiplier": 4.014},
    "big/wikitext103_moe_big_drop_expert_dropout_local_test.yaml": {
        **BIG, **SIGMA_MOE, "moe.n_experts": 32, "moe.expert_size": 128, "pkm.n_heads": 4,
        "moe.perplexity_reg": 0.001, "moe.drop_expert": 0.1},
    "smallbig/wikitext103_small_match_manyexperts.yaml": {
        **SMALL, "transformer.variant": "preln_relative", "transformer.ff_multiplier": 40, "grad_clip": 0.1},
    "smallbig/wikitext103_moe_smallbig.yaml": {
        **SMALL, **SIGMA_MOE, "grad_clip": 0.25, "moe.n_experts": 128, "moe.expert_size": 128, "pkm.n_heads": 4,
        "moe.perplexity_reg": 0.001, "moe.drop_expert": 0.05, "moe.selection_mode": ["sigmoid", "gate"]},
}

# (shipped grid, run) → (sweep file, the value chosen for each key the file lists several of, overrides the
# table makes: the ablation table's "no reg" row sets γ = 0 on the no-expert-dropout sweep)
PAPER_RUNS = {
    ("paper/enwik8_sigma_moe", "dense"): ("enwik8/enwik8_baseline.yaml", {}),
    ("paper/enwik8_sigma_moe", "sigma_moe"): (f"enwik8/{PREFIX}lowreg_exp_drop.yaml", {}),
    ("paper/sigma_moe_ablations", "dense"): ("enwik8/enwik8_baseline.yaml", {}),
    ("paper/sigma_moe_ablations", "sigma_moe"): (f"enwik8/{PREFIX}lowreg_exp_drop.yaml", {}),
    ("paper/sigma_moe_ablations", "standard_dropout"): (f"enwik8/{PREFIX}lowreg_dropout.yaml", {}),
    ("paper/sigma_moe_ablations", "softmax_after_topk"): (f"enwik8/{PREFIX}lowreg_exp_drop_softmax.yaml",
                                                          {"moe.activation_after_topk": 1}),
    ("paper/sigma_moe_ablations", "softmax_before_topk"): (f"enwik8/{PREFIX}lowreg_exp_drop_softmax.yaml",
                                                           {"moe.activation_after_topk": 0}),
    ("paper/sigma_moe_ablations", "standard_init"): (f"enwik8/{PREFIX}lowreg_exp_drop_bad_init.yaml", {}),
    ("paper/sigma_moe_ablations", "no_reg"): (f"enwik8/{PREFIX}lowreg_no_exp_drop.yaml", {"moe.perplexity_reg": 0.0}),
    ("paper/sigma_moe_ablations", "k2_g256"): (f"enwik8/{PREFIX}lowreg_exp_drop_k2_256.yaml", {}),
    ("paper/sigma_moe_ablations", "k1_g512"): (f"enwik8/{PREFIX}lowreg_exp_drop_k1_es512.yaml", {}),
    ("paper/sigma_moe_ablations", "switch_k1_g512"): (f"enwik8/{PREFIX}lowreg_exp_switch_es512_fixreg_init.yaml",
                                                      {"kvmem.dropout": "score"}),
    ("paper/sigma_moe_ablations", "switch_k1_g512_no_dropout"): (
        f"enwik8/{PREFIX}lowreg_exp_switch_es512_fixreg_init.yaml", {"kvmem.dropout": "none"}),
    ("paper/sigma_moe_ablations", "switch_k1_g128"): (f"enwik8/{PREFIX}lowreg_exp_switch_es128_fixreg_init.yaml",
                                                      {"kvmem.dropout": "score"}),
    ("paper/sigma_moe_ablations", "switch_k4_g128"): (f"enwik8/{PREFIX}lowreg_exp_switch_h4.yaml", {}),
    ("paper/sigma_moe_ablations", "sbase_k4_g128"): (f"enwik8/{PREFIX}lowreg_exp_drop_sinkmoid2.yaml",
                                                     {"moe.perplexity_reg": 0.0001}),
    ("paper/sigma_moe_ablations", "sbase_k1_g512"): (f"enwik8/{PREFIX}lowreg_exp_drop_sinkmoid2_h1.yaml", {}),
    ("paper/sigma_moe_ablations", "k1_g128"): (f"enwik8/{PREFIX}lowreg_exp_drop_k.yaml", {"pkm.n_heads": 1}),
    ("paper/sigma_moe_ablations", "k2_g128"): (f"enwik8/{PREFIX}lowreg_exp_drop_k.yaml", {"pkm.n_heads": 2}),
    ("paper/sigma_moe_ablations", "k8_g128"): (f"enwik8/{PREFIX}lowreg_exp_drop_k.yaml", {"pkm.n_heads": 8}),
    ("paper/sigma_moe_ablations", "twice_experts_g64"): (f"enwik8/{PREFIX}lowreg_exp_drop_2x_64.yaml", {}),
    ("paper/sigma_moe_ablations", "gamma_0"): (f"enwik8/{PREFIX}lowreg_exp_drop_nopplreg.yaml", {}),
    ("paper/pkm_topk", "dense"): ("enwik8/enwik8_baseline.yaml", {}),
    ("paper/pkm_topk", "topk_128"): ("enwik8/enwik8_baseline_topk_nocomp.yaml", {"transformer.topk_value": 128}),
    ("paper/pkm_topk", "topk_256"): ("enwik8/enwik8_baseline_topk_nocomp.yaml", {"transformer.topk_value": 256}),
    ("paper/pkm_topk", "topk_512"): ("enwik8/enwik8_baseline_topk_nocomp.yaml", {"transformer.topk_value": 512}),
    ("paper/pkm_topk", "pkm_softmax"): ("enwik8/enwik8_pkm_matched.yaml", {"transformer.activation": "softmax"}),
    ("paper/pkm_topk", "pkm_relu"): ("enwik8/enwik8_pkm_matched.yaml", {"transformer.activation": "relu"}),
    ("paper/pkm_topk", "pkm_relu_init"): ("enwik8/enwik8_pkm_matched_init.yaml", {}),
    ("paper/wt103_sigma_moe", "dense"): ("small/wikitext103_small_xl_nonshared_schedule_short_matched.yaml", {}),
    ("paper/wt103_sigma_moe", "sigma_moe"): (
        "small/wikitext103_small_moe_unshared_xl_nonshared_schedule_short_128.yaml", {}),
    ("paper/wt103_big", "dense"): ("big/wikitext103_baseline_big.yaml", {}),
    ("paper/wt103_big", "sigma_moe"): ("big/wikitext103_moe_big_drop_expert_dropout_local_test.yaml", {}),
    ("paper/wt103_many_experts", "dense"): ("smallbig/wikitext103_small_match_manyexperts.yaml", {}),
    ("paper/wt103_many_experts", "sigma_moe_128"): ("smallbig/wikitext103_moe_smallbig.yaml",
                                                    {"moe.selection_mode": "sigmoid"}),
}

# The d_ff each grid uses instead of int(state_size · ff_multiplier), and why: N_E·G = d_ff for the
# parameter-equal derivation (the authors' multipliers add the selector's parameters to the dense layer).
DENSE_D_FF = {(512, 4.01): 2048, (412, 4.985): 2048, (1024, 4.014): 4096, (412, 40): 16384}


def translate(sweep: dict) -> dict:
    """A sweep's settings as this toolkit's config keys (values every run of the sweep shares)."""
    out = {"model.d_model": sweep["state_size"], "model.n_layers": sweep["transformer.encoder_n_layers"],
           "model.n_heads": sweep["transformer.n_heads"], "model.dropout": sweep["dropout"],
           "model.attention_dropout": 0.0, "model.init": "paper", "train.lr": sweep["lr"],
           "data.batch_size": sweep["batch_size"], "data.seq_len": sweep["lm.unroll"],
           "train.max_steps": sweep["stop_after"], "train.val_every": sweep["test_interval"],
           "train.grad_clip": sweep["grad_clip"], "train.warmup_steps": sweep.get("lr_warmup", 0),
           "train.min_lr_ratio": 0.0 if sweep["lr_sched.type"] == "cos" else None,
           "train.weight_decay": 0.0, "train.beta1": 0.9, "train.beta2": 0.999,
           # Transformer-XL ("xl" in the sweep names): relative positions, the previous segment as memory
           "model.positions": "relative", "model.memory_segments": 1}
    if sweep.get("task") == "wikitext103_sp_transformer":  # SentencePiece, sentencepiece.n_pieces' default 8000
        out["data.tokenizer"] = "sentencepiece:8000"
    if "transformer.head_projection_size" in sweep:
        size = sweep["transformer.head_projection_size"]
        out["model.head_dim"] = size
    variant = sweep["transformer.variant"]
    if variant == "preln_relative":
        # their dense layer drops its hidden units at the model's dropout
        out |= {"model.ffn.kind": "dense", "model.ffn.dropout": sweep["dropout"]}
    elif variant == "preln_topk":
        out |= {"model.ffn.kind": "topk", "model.ffn.top_k": sweep["transformer.topk_value"],
                "model.ffn.dropout": sweep["dropout"]}
    elif variant == "preln_kvmem":
        # knn ≥ n_keys takes the authors' dense path (every slot, head scores summed): our knn = 0
        knn = 0 if sweep["pkm.knn"] >= sweep["pkm.n_keys"] else sweep["pkm.knn"]
        out |= {"model.ffn.kind": "pkm", "model.ffn.pkm.n_keys": sweep["pkm.n_keys"],
                "model.ffn.pkm.heads": sweep["pkm.n_heads"], "model.ffn.pkm.knn": knn, "model.ffn.pkm.query": "input",
                "model.ffn.pkm.activation": sweep["transformer.activation"], "model.ffn.dropout": 0.0,
                "model.ffn.pkm.value_fan_in": "slots" if sweep.get("pkm.custom_init", 0) == 5 else "d_model"}
    else:
        out |= _moe(sweep)
    return out


def _moe(sweep: dict) -> dict:
    n_experts, mode = sweep["moe.n_experts"], sweep["moe.selection_mode"]
    out = {"model.ffn.n_experts": n_experts, "model.ffn.expert_size": sweep["moe.expert_size"],
           "model.ffn.top_k": sweep["pkm.n_heads"],
           "model.ffn.dropout": sweep["dropout"] if sweep.get("kvmem.dropout", "none") == "score" else 0.0}
    if sweep["moe.reg_type"] == "switch":
        # 0.01 · mean_{t,e} P_te f_e = (0.01 / N_E²) · N_E Σ_e f_e P̄_e
        return out | {"model.ffn.kind": "switch", "model.ffn.switch.init_scale": sweep["moe.init_scale"],
                      "model.ffn.switch.balance_coef": sweep["moe.perplexity_reg"] / n_experts**2,
                      "model.ffn.switch.capacity_factor": 0.0}
    kind = "sbase" if mode == "sinkmoid2" else "sigma_moe"
    out |= {"model.ffn.kind": kind, f"model.ffn.{kind}.entropy_coef": sweep["moe.perplexity_reg"],
            f"model.ffn.{kind}.expert_dropout": sweep.get("moe.drop_expert", 0.0)}
    if kind == "sigma_moe":
        gate = {"sigmoid": "sigmoid", "gate": "softmax_topk" if sweep.get("moe.activation_after_topk") else "softmax"}
        out |= {"model.ffn.sigma_moe.gate": gate[mode], "model.ffn.sigma_moe.renormalize": False,
                "model.ffn.sigma_moe.init": "standard" if sweep.get("moe.expert_size_init") else "paper"}
    return out


def expected_config(grid: str, run: str) -> dict:
    """The config keys and values the run of ``grid`` must resolve to, from its sweep file."""
    path, chosen = PAPER_RUNS[(grid, run)]
    sweep = {**SWEEPS[path], **chosen}
    several = [k for k, v in sweep.items() if isinstance(v, list)]
    assert not several, f"{grid}/{run}: choose one value of {several} in PAPER_RUNS"
    out = translate(sweep)
    if out["model.ffn.kind"] in ("dense", "topk"):
        out["model.ffn.d_ff"] = DENSE_D_FF[sweep["state_size"], sweep["transformer.ff_multiplier"]]
    return out
