"""`legion app`: a web page to drop an image into and see LEGION's answer.

    legion app --model checkpoints/legion_7b --detector runs/legion_7b/detector     # http://127.0.0.1:7860

The page shows the verdict and P(fake) (with a detector), the explanation with each grounded phrase
highlighted in the colour of its mask, the image with the masks overlaid (each phrase can be switched
off), the timing, and a download of the JSON record (the same as a predictions.jsonl line). Page options:
gate threshold, max new tokens, SAM input size. Scripts can call the running app: the named API endpoint
`/analyze` takes an image and returns the JSON record, e.g. with `gradio_client`:

    from gradio_client import Client, handle_file
    record = Client("http://127.0.0.1:7860/").predict(handle_file("photo.jpg"), api_name="/analyze")

The model is loaded once (`legion.load`, the same code path as `legion infer`) and analyses one image
at a time. Requests are queued: one request handled at a time by default (`--concurrency`), at most
`--queue-size` waiting; beyond that the page shows Gradio's "queue is full" message (HTTP 503 to
scripts). Bad uploads (not an image, corrupt, too large) get a readable message and the app keeps
serving. It binds to 127.0.0.1 unless told otherwise, and makes no public share link
unless `--share` is given.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from legion.errors import OptionError

MAX_EXAMPLES = 8
# ImageReadError reasons (legion/data/images.py) in words a person uploading a file understands.
UPLOAD_PROBLEMS = {
    "corrupt": "the file is not an image this app can read, or it is damaged",
    "empty": "the image has no pixels",
    "decompression_bomb": "the image is too large",
    "unsupported_mode": "this kind of image (colour mode) is not supported",
    "missing": "the upload did not arrive",
    "not_a_file": "the upload did not arrive",
}


def _gradio():
    import gradio as gr

    return gr


def uploaded_image_class():
    """gr.Image whose upload reaches us as the file the user sent, undecoded: our image reader
    (legion.data.images, the one `legion infer` uses) then explains what is wrong with a bad upload,
    where Gradio's own decoding would fail with an internal error message."""
    gr = _gradio()

    class UploadedImage(gr.Image):
        def preprocess(self, payload):
            return None if payload is None else payload.path

        def get_block_name(self) -> str:
            return "image"  # the frontend draws it as the usual image component

    return UploadedImage


def example_images(paths) -> list[str]:
    """Up to MAX_EXAMPLES image files from files and folders (folders: their images, sorted)."""
    from legion.data.images import is_image_file

    found: list[str] = []
    for path in paths or []:
        path = Path(path)
        if path.is_dir():
            found += [str(p) for p in sorted(path.iterdir()) if p.is_file() and is_image_file(p.name)][:4]
        elif path.is_file():
            found.append(str(path))
    return found[:MAX_EXAMPLES]


class LegionApp:
    """The page's logic, independent of the web framework so it can be tested directly."""

    def __init__(self, legion_model):
        self.legion = legion_model  # legion.api.Legion
        self.analyzer = legion_model.analyzer
        # What a request that does not set an option gets (the API endpoint never does): the settings
        # the app started with, not whatever the last page visitor chose.
        self.defaults = {
            "gate_threshold": self.analyzer.gate_threshold,
            "max_new_tokens": self.analyzer.max_new_tokens,
            "sam_input_size": self.analyzer.sam_input_size,
        }
        # One model, one analysis at a time: a request's options are set and used under this lock.
        self.lock = threading.Lock()

    @property
    def sam_max(self) -> int:
        return int(self.analyzer.sam_pad_to)

    def analyze_path(self, path, gate_threshold=None, max_new_tokens=None, sam_input_size=None):
        """One uploaded file -> Analysis. Raises ImageReadError / OptionError with a readable message."""
        from legion.api import to_rgb_array

        if not path:
            raise OptionError("no image: upload or paste one first")
        image = to_rgb_array(Path(path))
        gate_threshold = self.defaults["gate_threshold"] if gate_threshold is None else float(gate_threshold)
        max_new_tokens = self.defaults["max_new_tokens"] if max_new_tokens is None else int(max_new_tokens)
        sam_input_size = self.defaults["sam_input_size"] if sam_input_size is None else int(sam_input_size)
        if not 0.0 <= gate_threshold <= 1.0:
            raise OptionError("gate threshold must be between 0 and 1")
        if max_new_tokens < 1:
            raise OptionError("max new tokens must be >= 1")
        if sam_input_size is not None and not 1 <= sam_input_size <= self.sam_max:
            raise OptionError(f"SAM input size must be between 1 and {self.sam_max}")
        with self.lock:
            self.analyzer.gate_threshold = gate_threshold
            self.analyzer.max_new_tokens = max_new_tokens
            self.analyzer.sam_input_size = sam_input_size
            analysis = self.legion.analyze(image)
        analysis.record.image = Path(path).name
        return analysis

    @staticmethod
    def verdict_html(analysis) -> str:
        from legion.gallery import colour

        record = analysis.record
        colour_of = {"fake": "#c0392b", "real": "#27ae60"}.get(record.verdict, "#7f8c8d")
        prob = f" &nbsp; P(fake) = {record.fake_prob:.3f}" if record.fake_prob is not None else ""
        seconds = f" &nbsp; <small>{record.seconds:.2f} s</small>" if record.seconds is not None else ""
        chips = "".join(
            f'<span class="legion-chip" style="border-bottom: 3px solid rgb{colour(i)}">{html.escape(p)}</span> '
            for i, p in enumerate(record.phrases)
        )
        return (
            f'<div id="legion-verdict"><span style="background:{colour_of};color:white;border-radius:10px;'
            f'padding:2px 10px;font-weight:600">{html.escape(str(record.verdict))}</span>{prob}{seconds}'
            f"<div>{chips}</div></div>"
        )

    @staticmethod
    def explanation_html(analysis) -> str:
        from legion.gallery import highlight_phrases

        record = analysis.record
        if record.verdict == "fake":
            body = highlight_phrases(record.explanation or "", record.phrases or [])
        elif record.verdict == "real":
            body = "No artifact analysis: the detector judged this image real."
        else:
            body = html.escape(record.error or "the analysis failed")
        return f'<div id="legion-explanation" style="line-height:1.5">{body}</div>'

    @staticmethod
    def overlay(analysis, selected: list[str] | None = None):
        """The image with the masks of the `selected` phrase labels (all when None), colours kept per phrase."""
        from PIL import Image

        from legion.gallery import overlay_masks

        masks = analysis.masks
        labels = phrase_labels(analysis)
        keep = set(labels if selected is None else selected)
        shown = [m if label in keep else np.zeros_like(m) for m, label in zip(masks, labels)]
        return Image.fromarray(overlay_masks(analysis.image, shown))

    @staticmethod
    def record_file(analysis) -> str:
        folder = Path(tempfile.mkdtemp(prefix="legion_record_"))
        path = folder / f"{Path(analysis.record.image or 'image').stem}.json"
        path.write_text(json.dumps(analysis.to_json(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return str(path)


def upload_problem(exc: Exception) -> str:
    """The page's message for an upload that cannot be analysed (no server paths in it)."""
    from legion.data.images import ImageReadError

    if isinstance(exc, ImageReadError):
        name = Path(exc.path).name
        what = UPLOAD_PROBLEMS.get(exc.reason, exc.reason.replace("_", " "))
        return f"Cannot analyse {name}: {what}" + (f" ({exc.detail})" if exc.reason == "decompression_bomb" else "")
    return f"Cannot analyse this upload: {exc}"


def phrase_labels(analysis) -> list[str]:
    """One label per mask: "1. phrase" (numbered: two phrases can read the same)."""
    phrases = analysis.record.phrases or []
    return [f"{i + 1}. {phrases[i] if i < len(phrases) else '(no phrase)'}" for i in range(len(analysis.record.masks))]


def build_app(legion_model, examples=(), concurrency: int = 1, queue_size: int = 8, title: str = "LEGION"):
    """The Gradio Blocks page (not launched)."""
    gr = _gradio()
    logic = LegionApp(legion_model)
    analyzer = logic.analyzer

    def run(path, gate_threshold, max_new_tokens, sam_input_size):
        from legion.data.images import ImageReadError
        from legion.errors import LegionError

        start = time.perf_counter()
        try:
            analysis = logic.analyze_path(path, gate_threshold, max_new_tokens, sam_input_size)
        except (ImageReadError, LegionError, ValueError) as exc:
            raise gr.Error(upload_problem(exc), duration=None) from None
        labels = phrase_labels(analysis)
        timing = f"{time.perf_counter() - start:.2f} s for this request ({analysis.record.seconds:.2f} s analysis)"
        return (
            logic.verdict_html(analysis),
            logic.explanation_html(analysis),
            logic.overlay(analysis),
            gr.CheckboxGroup(choices=labels, value=labels, visible=bool(labels)),
            logic.record_file(analysis),
            timing,
            analysis,
        )

    def toggle(analysis, selected):
        return None if analysis is None else logic.overlay(analysis, selected)

    def analyze_api(path):
        """The JSON record of one image (the same as a predictions.jsonl line of `legion infer`)."""
        from legion.data.images import ImageReadError
        from legion.errors import LegionError

        try:
            return logic.analyze_path(path).to_json()
        except (ImageReadError, LegionError, ValueError) as exc:
            raise gr.Error(upload_problem(exc)) from None

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(
            f"## {html.escape(title)}: where does this image look synthetic, and why?\n"
            "Upload or paste an image. LEGION answers with an explanation whose grounded phrases each come "
            "with a mask" + (" (a real/fake detector decides first)." if analyzer.detector is not None else ".")
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = uploaded_image_class()(
                    type="filepath", sources=["upload", "clipboard"], label="Image", elem_id="upload"
                )
                with gr.Accordion("Options", open=False):
                    gate = gr.Slider(
                        0.0,
                        1.0,
                        value=analyzer.gate_threshold,
                        step=0.01,
                        label="Gate threshold: P(fake) below it is judged real (needs a detector)",
                        interactive=analyzer.detector is not None,
                    )
                    tokens = gr.Slider(1, 1024, value=analyzer.max_new_tokens, step=1, label="Max new tokens")
                    sam = gr.Slider(
                        64,
                        logic.sam_max,
                        value=analyzer.sam_input_size,
                        step=16,
                        label="SAM input size (ResizeLongestSide)",
                    )
                button = gr.Button("Analyse", variant="primary", elem_id="analyse")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[image], label="Examples")
            with gr.Column(scale=1):
                verdict = gr.HTML(label="Verdict")
                explanation = gr.HTML(label="Explanation")
                overlay = gr.Image(type="pil", label="Masks", elem_id="overlay", interactive=False)
                phrases = gr.CheckboxGroup(label="Show masks of", visible=False)
                timing = gr.Markdown()
                record = gr.File(label="JSON record (predictions.jsonl line)")
        state = gr.State(None)
        outputs = [verdict, explanation, overlay, phrases, record, timing, state]
        button.click(run, [image, gate, tokens, sam], outputs, api_name=False, concurrency_limit=concurrency)
        phrases.change(toggle, [state, phrases], [overlay], api_name=False, concurrency_limit=None)
        hidden_in = uploaded_image_class()(type="filepath", visible=False)
        hidden_out = gr.JSON(visible=False)
        hidden_in.change(analyze_api, [hidden_in], [hidden_out], api_name="analyze", concurrency_limit=concurrency)
    page.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    return page


# --- CLI ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder, checkpoints/<name>, or a Hub id (org/name)")
    parser.add_argument("--detector", default=None, help="real/fake detector folder (legion cls-train)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--examples", nargs="*", default=[], help="example images or folders shown under the upload")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--sam-input-size", type=int, default=None, help="default: the SAM encoder's size")
    parser.add_argument("--concurrency", type=int, default=1, help="analyses at a time (default 1 per model)")
    parser.add_argument("--queue-size", type=int, default=8, help="requests waiting at most (default 8)")
    parser.add_argument("--vision-tower", default=None, help="CLIP folder when the model has none")


def run(args: argparse.Namespace) -> int:
    import legion

    if args.concurrency < 1 or args.queue_size < 1:
        raise OptionError("--concurrency and --queue-size must be >= 1")
    if not 0 < args.port < 65536:
        raise OptionError(f"--port {args.port}: not a port number")
    settings = {"max_new_tokens": args.max_new_tokens, "sam_input_size": args.sam_input_size}
    if args.vision_tower:
        settings["vision_tower"] = args.vision_tower
    model = legion.load(args.model, detector=args.detector, device=args.device, dtype=args.dtype, **settings)
    page = build_app(model, example_images(args.examples), args.concurrency, args.queue_size)
    print(f"LEGION app on http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    page.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        show_error=True,
        footer_links=["api"],
        allowed_paths=[os.path.abspath(p) for p in args.examples],
    )
    return 0
