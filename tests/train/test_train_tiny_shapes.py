"""train/tiny_shapes.py at toy size: it writes a checkpoint the normal loader takes, reproducibly from its seed, and
its pieces (the VQA rows, the VAE latent normalisation) are what the pipeline reads at inference."""

import collections
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flashu_batch.showo2.tiny import CHECKPOINTS
from flashu_batch.train import tiny_world as world
from flashu_batch.showo2.pipeline import Showo2Pipeline
from flashu_batch.showo2.tokenizer import SpecialTokens
from flashu_batch.train import tiny_shapes as train

TOY = ["--n-scenes", "24", "--vae-steps", "3", "--vae-batch", "4", "--steps", "3", "--t2i-batch", "4",
       "--vqa-batch", "4", "--width", "32", "--layers", "2", "--ffn", "64", "--head-ffn", "32", "--head-layers", "1",
       "--warmup", "1", "--log-every", "1", "--procs", "1", "--vae-check", "0", "--redraw-steps", "0",
       "--recover-steps", "0"]  # the joint stage only, unless a test adds stages


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    folders = []
    for name in ("a", "b"):
        out = str(base / name)
        assert train.main(TOY + ["--out", out, "--seed", "7"]) == 0
        folders.append(out)
    return folders


def test_writes_a_checkpoint_the_pipeline_loads(toy_runs):
    folder = toy_runs[0]
    for name in ("config.json", "model.safetensors", "Wan2.1_VAE.pth", "vae_config.json", "tokenizer.json",
                 "training.json"):
        assert os.path.isfile(os.path.join(folder, name)), name
    pipe = Showo2Pipeline.from_pretrained(folder)
    assert pipe.model.config.llm["num_hidden_layers"] == 2 and pipe.model.config.hidden_size == 32
    images = pipe.text_to_image(["a red circle on the left"], num_inference_steps=2, guidance_scale=4.0)
    assert images[0].size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    answers = pipe.answer(images, ["what color is the circle?"], max_new_tokens=2)
    assert len(answers) == 1
    with open(os.path.join(folder, "training.json")) as f:
        meta = json.load(f)
    assert meta["args"]["seed"] == 7 and meta["args"]["steps"] == 3 and len(meta["history"]) == 3
    assert meta["weights_dtype"] == "bfloat16" and "python -m train.tiny_shapes" in meta["command"]


def test_same_seed_same_weights(toy_runs):
    a, b = (load_file(os.path.join(f, "model.safetensors")) for f in toy_runs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    va, vb = (torch.load(os.path.join(f, "Wan2.1_VAE.pth"), weights_only=True) for f in toy_runs)
    assert all(torch.equal(va[k], vb[k]) for k in va)


def test_init_from_goes_on_from_a_checkpoint(toy_runs, tmp_path):
    # VQA-only steps from run a: the LLM moves, the flow head (not in the VQA graph) and the VAE stay as they were
    out = str(tmp_path / "ft")
    assert train.main(TOY + ["--out", out, "--seed", "7", "--init-from", toy_runs[0], "--t2i-batch", "0",
                             "--width", "16"]) == 0
    before, after = (load_file(os.path.join(f, "model.safetensors")) for f in (toy_runs[0], out))
    assert before.keys() == after.keys()  # the checkpoint's architecture, not --width 16
    head = [k for k in before if k.startswith("diffusion_head")]
    assert head and all(torch.equal(before[k], after[k]) for k in head)
    assert not torch.equal(before["showo.model.layers.0.mlp.up_proj.weight"],
                           after["showo.model.layers.0.mlp.up_proj.weight"])
    va, vb = (torch.load(os.path.join(f, "Wan2.1_VAE.pth"), weights_only=True) for f in (toy_runs[0], out))
    assert all(torch.equal(va[k], vb[k]) for k in va)
    with open(os.path.join(out, "training.json")) as f:
        assert json.load(f)["init_from"] == toy_runs[0]


def test_glue_spaces_trains_with_the_shorter_rows_and_init_from_must_agree(toy_runs, tmp_path, capsys):
    out = str(tmp_path / "glued")
    assert train.main(TOY + ["--out", out, "--glue-spaces", "1"]) == 0
    tokenizer = Showo2Pipeline.from_pretrained(out).tokenizer
    assert tokenizer.tokenize("a red circle") == ["a", "Ġred", "Ġcircle"]  # byte-level: "Ġ" is the space
    assert len(tokenizer) > len(train.build_world_tokenizer(glue_spaces=0))
    # going on from a checkpoint with the other tokenizer is refused before any work: its vocabulary differs
    with pytest.raises(SystemExit) as exit_info:
        train.main(TOY + ["--out", str(tmp_path / "x"), "--init-from", toy_runs[0], "--glue-spaces", "1"])
    assert exit_info.value.code == 2 and "vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_init_from_a_missing_folder_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TOY + ["--out", str(tmp_path / "x"), "--init-from", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_vqa_rows_supervise_only_the_answers_and_their_end():
    tokenizer = train.build_world_tokenizer()
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    scenes = world.sample_scenes("train", 8, seed=0)
    batcher = train.Batcher(tokenizer, tokens, scenes, num_image_slots=17, seed=0)
    seqs, labels = batcher.vqa(list(range(8)), turns=2)
    assert labels.shape == seqs.input_ids.shape
    for row in range(8):
        supervised = [t for t in labels[row].tolist() if t != -100]
        answers = tokenizer.decode(supervised).split("<|im_end|>")
        # two turns: "<answer><|im_end|><answer><|im_end|>"; every answer is a word of the world's answer set
        assert supervised.count(tokens.eos) == 2 and answers[-1] == ""
        valid = {a for s in scenes for _, a in world.questions(s)} | {"no"}
        assert all(a.strip() in valid for a in answers[:-1]), answers
        # the image span is never a label; the labelled tokens are where the row holds them
        offset = int(seqs.image_offsets[row])
        assert (labels[row, offset:offset + 17] == -100).all()
        kept = labels[row] != -100
        assert torch.equal(labels[row][kept], seqs.input_ids[row][kept])


def test_caption_answers_list_the_objects_in_reading_order():
    tokenizer = train.build_world_tokenizer()
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    scenes = [s for s in world.sample_scenes("train", 60, seed=1) if len(s.objects) == 3][:8]
    batcher = train.Batcher(tokenizer, tokens, scenes, num_image_slots=17, seed=0, caption_order="reading")
    seqs, labels = batcher.vqa(list(range(len(scenes))), turns=1, caption_rows=1.0)
    reading = ("top", "left", "center", "right", "bottom")
    shuffled = 0
    for row, scene in enumerate(scenes):
        answer = tokenizer.decode([t for t in labels[row].tolist() if t != -100]).removesuffix("<|im_end|>")
        objects = world.parse_caption(answer)
        assert set(objects) == set(scene.objects)  # the same scene, described whole
        assert [o.position for o in objects] == sorted((o.position for o in objects), key=reading.index)
        shuffled += objects != scene.objects
    assert shuffled  # the scenes' own (prompt) order differs: the reading order is the answer's, not theirs


def test_normalised_latents_have_unit_statistics():
    torch.manual_seed(0)
    vae = train.WanVAE(train.vae_config()).eval()
    images = torch.from_numpy(np.stack([np.asarray(world.render(s)) for s in world.sample_scenes("train", 16, seed=1)]))
    mu = train.posterior_means(vae, images)
    final, latents = train.normalised_vae(vae, mu)
    assert latents.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (latents.std(dim=(0, 2, 3)) - 1).abs().max() < 2e-2
    # the shipped VAE's own normalisation gives the same latents
    with torch.no_grad():
        assert torch.allclose(final.encode(train.to_pixels(images)), latents, atol=1e-4)


def test_default_arguments_build_the_shipped_architecture():
    """The script's defaults describe the shipped checkpoint, so retraining with them reproduces its shapes."""
    from flashu_batch.showo2.config import Showo2Config

    shipped = Showo2Config.from_pretrained(CHECKPOINTS["tiny-shapes"])
    args = train.TrainArgs()
    built = train.model_config(len(train.build_world_tokenizer()), args.width, args.layers, args.ffn, args.head_ffn,
                               args.head_layers, args.semantic_width, args.semantic_layers, args.rope_theta,
                               args.kv_heads, args.heads)
    for field in ("hidden_size", "clip_latent_dim", "image_latent_dim", "patch_size", "num_diffusion_layers",
                  "llm_vocab_size", "num_und_layers"):
        assert getattr(built, field) == getattr(shipped, field), field
    for key in ("num_attention_heads", "num_key_value_heads", "rope_theta"):
        assert built.llm[key] == shipped.llm[key], key
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
        assert built.llm[key] == shipped.llm[key] and built.siglip[key] == shipped.siglip[key], key


def test_more_heads_train_and_load(tmp_path):
    """--heads / --kv-heads set the LLM's attention heads (narrower ones, at the same width) in the written
    checkpoint, and the pipeline runs with them."""
    out = str(tmp_path / "heads")
    assert train.main(TOY + ["--out", out, "--heads", "8", "--kv-heads", "4"]) == 0
    pipe = Showo2Pipeline.from_pretrained(out)
    llm = pipe.model.config.llm
    assert (llm["num_attention_heads"], llm["num_key_value_heads"], llm["hidden_size"]) == (8, 4, 32)
    images = pipe.text_to_image(["a red circle on the left"], num_inference_steps=2)
    assert len(pipe.answer(images, ["what color is the circle?"], max_new_tokens=2)) == 1


def test_heads_that_do_not_share_the_key_value_heads_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TOY + ["--out", str(tmp_path / "x"), "--heads", "8", "--kv-heads", "3"])
    assert exit_info.value.code == 2 and "not a multiple of num_key_value_heads 3" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_unknown_caption_order_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TOY + ["--out", str(tmp_path / "x"), "--caption-order", "Reading"])
    assert exit_info.value.code == 2 and "expected 'reading' or 'scene'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_run_with_no_training_steps_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TOY + ["--out", str(tmp_path / "x"), "--steps", "0"])
    assert exit_info.value.code == 2 and "no training steps" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert [name for name, _ in train.stages(train.TrainArgs(steps=0, redraw_steps=0, recover_steps=5))] == ["recover"]
    with pytest.raises(SystemExit) as exit_info:
        train.main(TOY + ["--out", str(tmp_path / "x"), "--draw-steps", "-5"])
    assert exit_info.value.code == 2 and "--draw-steps -5: a number of steps" in capsys.readouterr().err


def test_a_gpu_run_in_several_processes_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TOY + ["--out", str(tmp_path / "x"), "--device", "cuda", "--procs", "2"])
    assert exit_info.value.code == 2 and "--device cuda trains in one process" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_content_questions_draw_the_turns_from_the_content_kinds():
    tokenizer = train.build_world_tokenizer()
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    scenes = world.sample_scenes("train", 40, seed=2)

    def kinds(content_questions):
        batcher = train.Batcher(tokenizer, tokens, scenes, num_image_slots=17, seed=0)
        drawn = []
        for qa in batcher.qa:
            picks = batcher.pick_questions(qa, 3, content_questions)
            assert len(set(picks)) == len(picks) == min(3, len(qa))  # distinct questions of this scene
            drawn += [world.question_kind(qa[k][0]) for k in picks]
        return drawn

    uniform, focused = kinds(0.0), kinds(1.0)
    # every scene has at least 3 content questions (its "no" question, and per object "where"/"is there")
    assert all(k in train.CONTENT_KINDS for k in focused)
    assert 0.3 < sum(k in train.CONTENT_KINDS for k in uniform) / len(uniform) < 0.8


def test_the_kind_mix_draws_each_turn_by_its_kind_weight():
    tokenizer = train.build_world_tokenizer()
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    scenes = world.sample_scenes("train", 600, seed=2)
    batcher = train.Batcher(tokenizer, tokens, scenes, num_image_slots=17, seed=0)
    drawn = collections.Counter()
    for qa in batcher.qa:
        picks = batcher.pick_questions(qa, 3, 0.8, train.KIND_WEIGHTS)  # content_questions does not apply
        assert len(set(picks)) == len(picks) == min(3, len(qa))  # distinct questions of this scene
        drawn.update(world.question_kind(qa[k][0]) for k in picks)
    share = {kind: n / sum(drawn.values()) for kind, n in drawn.items()}
    # uniformly over the scene's questions, colour / shape at a position are 14% each and counting by shape 22%
    assert share["color_at"] > 0.16 and share["shape_at"] > 0.16 and share["count_shape"] < 0.13
    assert share["count"] < share["count_shape"] < share["where"]
    only = batcher.pick_questions(batcher.qa[0], 3, kind_weights={"count": 1.0})  # one count question per scene
    assert [world.question_kind(batcher.qa[0][k][0]) for k in only] == ["count"]


def test_the_stages_draw_joint_focus_redraw_recover_run_in_order(tmp_path, monkeypatch, capsys):
    calls = []

    class Recording(train.Batcher):
        def t2i(self, index, cfg_drop):
            calls.append("t2i")
            return super().t2i(index, cfg_drop)

        def vqa(self, index, turns=1, caption_rows=0.0, content_questions=0.0, kind_weights=None):
            calls.append((caption_rows, content_questions if kind_weights is None else kind_weights))
            return super().vqa(index, turns, caption_rows, content_questions, kind_weights)

    monkeypatch.setattr(train, "Batcher", Recording)
    out = str(tmp_path / "staged")
    assert train.main(TOY + ["--out", out, "--caption-rows", "0.5", "--question-mix", "content",
                             "--content-questions", "0.2",
                             "--vqa-lr-scale", "0.25", "--draw-steps", "2", "--focus-steps", "2", "--focus-lr", "2e-3",
                             "--focus-content-questions", "0.9", "--redraw-steps", "2", "--redraw-lr", "3e-3",
                             "--recover-steps", "2", "--recover-lr", "1e-3", "--stage-warmup", "1",
                             "--save-every", "5"]) == 0
    draw, joint, focus, redraw, recover = calls[:2], calls[2:5], calls[5:7], calls[7:9], calls[9:]
    assert draw == redraw == ["t2i", "t2i"]  # T2I only
    assert joint == ["t2i", (0.5, 0.2), "t2i"]  # T2I and VQA in turn, the recipe's question mix
    assert focus == [(0.0, 0.9), (0.0, 0.9)]  # VQA only, questions only, mostly content kinds
    assert recover == ["t2i", (0.5, 0.9)]  # in turn again, caption rows back, the focus question mix kept
    with open(os.path.join(out, "training.json")) as f:
        meta = json.load(f)
    assert [(h["stage"], h["step"]) for h in meta["history"]] == \
        [("draw", 0), ("draw", 1), ("joint", 2), ("joint", 3), ("joint", 4), ("focus", 5), ("focus", 6),
         ("redraw", 7), ("redraw", 8), ("recover", 9), ("recover", 10)]
    logged = {int(m[1]): float(m[2]) for m in re.finditer(r" step +(\d+) .* lr (\S+)", capsys.readouterr().out)}
    # each stage its own cosine schedule from its own peak learning rate (the VQA steps at x vqa_lr_scale)
    assert logged[1] == pytest.approx(train.cosine_lr(1, 2, 4e-3, 1), rel=1e-2)
    assert logged[2] == pytest.approx(train.cosine_lr(0, 3, 4e-3, 1), rel=1e-2)
    assert logged[5] == pytest.approx(train.cosine_lr(0, 2, 2e-3, 1), rel=1e-2)
    assert logged[7] == pytest.approx(train.cosine_lr(0, 2, 3e-3, 1), rel=1e-2)
    assert logged[9] == pytest.approx(train.cosine_lr(0, 2, 1e-3, 1), rel=1e-2)
    assert logged[10] == pytest.approx(0.25 * train.cosine_lr(1, 2, 1e-3, 1), rel=1e-2)
    assert Showo2Pipeline.from_pretrained(out).model.config.hidden_size == 32
    # --save-every counts steps across stages: step 5 is the joint stage's last, step 10 is within the recover
    # stage; the run's last (11) is `out` itself
    assert sorted(n for n in os.listdir(out) if n.startswith("step-")) == ["step-10", "step-5"]


def test_the_default_recipe_is_joint_then_redraw_then_recover():
    args = train.TrainArgs()
    plan = dict(train.stages(args))
    assert list(plan) == ["joint", "redraw", "recover"]
    assert plan["redraw"].vqa_batch == 0 and plan["redraw"].lr == args.redraw_lr
    # no focus stage: the recover stage keeps the joint stage's question mix and VQA learning rate
    assert (plan["recover"].question_mix, plan["recover"].content_questions) == ("content", args.content_questions)
    assert plan["recover"].vqa_lr_scale == args.vqa_lr_scale and plan["recover"].caption_rows == args.caption_rows


def test_lr_decay_holds_the_peak_then_falls_by_a_cosine_in_the_joint_stage_only():
    peak, floor = 4e-3, 0.05
    plain = [train.cosine_lr(s, 1000, peak, 100) for s in range(1000)]
    assert plain == [train.cosine_lr(s, 1000, peak, 100, decay=1.0) for s in range(1000)]
    assert plain[99] == peak and plain[100] == peak and plain[550] == pytest.approx(peak * (floor + (1 - floor) / 2))
    held = [train.cosine_lr(s, 1000, peak, 100, decay=0.2) for s in range(1000)]
    assert held[:100] == plain[:100]  # the same warmup
    assert all(lr == peak for lr in held[100:820]) and held[821] < peak  # held until the last 20% of 900 steps
    assert all(a > b for a, b in zip(held[820:], held[821:])) and held[-1] == pytest.approx(peak * floor, rel=0.01)
    plan = dict(train.stages(train.TrainArgs(lr_decay=0.2, draw_steps=5, focus_steps=5)))
    assert {name: a.lr_decay for name, a in plan.items()} == \
        {"draw": 1.0, "joint": 0.2, "focus": 1.0, "redraw": 1.0, "recover": 1.0}


@pytest.mark.parametrize("value", ["0", "-0.2", "1.5"])
def test_an_lr_decay_outside_0_to_1_is_refused(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TOY + ["--out", str(tmp_path / "x"), "--lr-decay", value])
    assert exit_info.value.code == 2 and f"--lr-decay {float(value)}: a fraction" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def descendants(pid: int) -> set[int]:
    """The live process tree under `pid` (Linux /proc)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except FileNotFoundError:
            continue
        found.update(kids)
        todo.extend(kids)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads the process tree from Linux /proc")
def test_a_sigterm_to_a_two_process_run_stops_its_workers(tmp_path):
    import subprocess
    import sys
    import time

    argv = with_flag(with_flag(TOY, "--procs", "2"), "--steps", "100000")  # two workers, still training when stopped
    log = open(tmp_path / "log", "w+")
    parent = subprocess.Popen([sys.executable, "-m", "train.tiny_shapes", *argv, "--out", str(tmp_path / "x")],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "joint step" not in (tmp_path / "log").read_text():  # both workers are training
            assert parent.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.5)
        workers = descendants(parent.pid)
        assert len(workers) >= 2
        parent.terminate()
        assert parent.wait(timeout=60) == 128 + 15
        deadline = time.time() + 30
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if alive(w)], "workers left training after the run was stopped"
    finally:
        for p in [parent.pid, *descendants(parent.pid)]:
            try:
                os.kill(p, 9)
            except ProcessLookupError:
                pass
