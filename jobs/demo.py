"""`flashu-batch demo`: a few images and a few answers with a small model, written to a folder.

It runs the same pipeline a production worker runs (checkpoint folder -> Showo2Pipeline -> PNG / text), on a
model small enough for a laptop CPU. With no --model it builds the tiny seeded-random checkpoint first.
"""

import json
import os
import time

DEMO_PROMPTS = ["a red circle on the left", "a blue square at the top", "a fox in the snow at sunset"]
DEMO_QUESTIONS = ["what is shown in this picture?", "what color is the shape?", "how many shapes are there?"]


def run_demo(out: str, model: str | None = None) -> None:
    import torch

    from showo2.pipeline import Showo2Pipeline
    from showo2.tiny import build_tiny_checkpoint

    os.makedirs(out, exist_ok=True)
    if model is None:
        model = os.path.join(out, "model")
        if not os.path.isfile(os.path.join(model, "config.json")):
            print(f"building the tiny random-weight Show-o2 checkpoint in {model}")
            build_tiny_checkpoint(model)
    pipe = Showo2Pipeline.from_pretrained(model, dtype=torch.float32, device="cpu")

    start = time.perf_counter()
    images = pipe.text_to_image(DEMO_PROMPTS, seeds=list(range(len(DEMO_PROMPTS))), num_inference_steps=10,
                                guidance_scale=5.0, truncate=True)
    for i, (prompt, image) in enumerate(zip(DEMO_PROMPTS, images)):
        path = os.path.join(out, f"t2i_{i}.png")
        image.save(path)
        print(f"t2i  {path}  {prompt!r}")
    answers = pipe.answer(images, DEMO_QUESTIONS, max_new_tokens=16)
    with open(os.path.join(out, "vqa.jsonl"), "w") as f:
        for i, (question, answer) in enumerate(zip(DEMO_QUESTIONS, answers)):
            f.write(json.dumps({"image": f"t2i_{i}.png", "question": question, "answer": answer}) + "\n")
            print(f"vqa  t2i_{i}.png  {question!r} -> {answer!r}")
    print(f"done in {time.perf_counter() - start:.1f}s; results in {out}/")
