"""`flashu-batch preview OUTPUT --out sheet.png`: a contact sheet of a job's committed results, to glance at.

OUTPUT is a task's output folder (`<output>/<job_id>/<task>`) or a job's (`<output>/<job_id>`: every task folder
in it), local or s3://. Only committed rows are read (jobs/output.py `read_output`). T2I tiles show the image and its
prompt; VQA tiles show the input image (read back from its path or URI when the row kept one) with the question and
the answer. Error rows show their error, so a sheet also shows what went wrong.
"""

import io
import textwrap

from flashu_batch.jobs.output import TaskOutput, read_output
from flashu_batch.jobs.storage import Storage, join

TILE = 192         # tile width and image box, pixels
TEXT_LINES = 5     # lines of text under each image
LINE_HEIGHT = 12
CHARS_PER_LINE = 30
BACKGROUND, INK, ERROR_INK = (255, 255, 255), (20, 20, 20), (180, 0, 0)


def task_roots(storage: Storage, output: str) -> list[str]:
    """The task folders under `output`: itself when it is one, else its sub-folders that hold task results."""
    def is_task(root: str) -> bool:
        return TaskOutput(storage, root).has_output()

    if is_task(output):
        return [output]
    roots = sorted({join(output, f["uri"][len(output.rstrip("/")) + 1:].split("/", 1)[0])
                    for f in storage.list(output) if "/" in f["uri"][len(output.rstrip("/")) + 1:]})
    roots = [r for r in roots if is_task(r)]
    if not roots:
        raise ValueError(f"{output!r} holds no committed task results (a folder <output>/<job_id>/<task> or "
                         f"<output>/<job_id>).")
    return roots


def fit(image, box: int):
    """`image` scaled into a box x box square: small images by a whole factor with nearest-neighbour (pixel art
    stays crisp), large ones down with a smooth filter."""
    from PIL import Image

    image = image.convert("RGB")
    scale = box / max(image.size)
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
    if scale >= 1:
        scale = int(scale)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, resample)


def tile_text(row: dict, kind: str) -> tuple[list[str], bool]:
    """The lines under a tile, and whether they report an error."""
    if row.get("error"):
        return textwrap.wrap(f"error: {row['error']}", CHARS_PER_LINE)[:TEXT_LINES], True
    if kind == "t2i":
        return textwrap.wrap(str(row.get("prompt") or ""), CHARS_PER_LINE)[:TEXT_LINES], False
    question = textwrap.wrap(f"Q: {row.get('question') or ''}", CHARS_PER_LINE)
    answer = textwrap.wrap(f"A: {row.get('answer') or ''}", CHARS_PER_LINE)
    return (question[:TEXT_LINES - min(2, len(answer))] + answer)[:TEXT_LINES], False


def tile_image(storage: Storage, row: dict, kind: str):
    """The picture of a row, or None (an error row, or a VQA row whose image came inline and was not kept)."""
    from PIL import Image

    try:
        if kind == "t2i":
            data = (row.get("image") or {}).get("bytes")
        else:
            path = row.get("image_path")
            data = storage.read_bytes(path) if path else None
        return Image.open(io.BytesIO(data)) if data else None
    except (OSError, ValueError):  # the image is gone or unreadable: the tile says so instead
        return None


def contact_sheet(storage: Storage, output: str, limit: int = 16, columns: int = 4):
    """(PIL image, number of rows shown) of the first `limit` committed rows of each task under `output`."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    tiles = []
    for root in task_roots(storage, output):
        table = read_output(storage, root, limit)  # only the files that hold the first `limit` rows are read
        kind = "t2i" if "prompt" in table.column_names else "vqa"
        for row in table.to_pylist():
            tile = Image.new("RGB", (TILE, TILE + TEXT_LINES * LINE_HEIGHT + 8), BACKGROUND)
            draw = ImageDraw.Draw(tile)
            picture = tile_image(storage, row, kind)
            if picture is None:
                draw.rectangle([0, 0, TILE - 1, TILE - 1], fill=(230, 230, 230))
                draw.text((8, TILE // 2 - 6), "no image", fill=INK, font=font)
            else:
                picture = fit(picture, TILE)
                tile.paste(picture, ((TILE - picture.width) // 2, (TILE - picture.height) // 2))
            lines, is_error = tile_text(row, kind)
            for i, line in enumerate(lines):
                draw.text((4, TILE + 4 + i * LINE_HEIGHT), line, fill=ERROR_INK if is_error else INK, font=font)
            tiles.append(tile)
    if not tiles:
        raise ValueError(f"{output!r}: no committed rows to show yet.")
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    pad = 6
    width, height = tiles[0].size
    sheet = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + pad) + pad), (200, 200, 200))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (pad + (i % columns) * (width + pad), pad + (i // columns) * (height + pad)))
    return sheet, len(tiles)


def write_preview(output: str, out_png: str, storage: Storage | None = None, limit: int = 16) -> int:
    """Draw the sheet of `output` into the local PNG file `out_png` -> the number of rows shown."""
    sheet, shown = contact_sheet(storage or Storage(), output, limit)
    sheet.save(out_png)
    return shown
