"""The cost model: what a request will cost, charged before any expensive work starts.

Every cost below is known from the body or from image headers alone; a request over a budget is
refused before anything is decoded or encoded, with the setting that refused it named.

    cost                          charged from                    budget (DUET_...)         refusal
    image bytes                   upload / base64 / download size MAX_UPLOAD_BYTES          413
    decoded pixels of an image    its header (width x height)     MAX_IMAGE_PIXELS          413
    pixels after the model resize its header + the model's resize MAX_RESIZED_PIXELS        413
    decoded pixels of a request   every image header              MAX_REQUEST_PIXELS        413
    texts + images of a request   count                           MAX_ITEMS_PER_REQUEST     422
    a text, label or template     characters                      MAX_TEXT_CHARS            422
    /classify prompts             labels x templates              MAX_CLASSIFY_PROMPTS      422
    encoder work                  encode items: 1 per text,       MAX_QUEUE_ITEMS (all      429
                                  image or uncached prompt        requests together)
    tokenizing a text or prompt   its first 16 x context chars,   fixed by common.tokenize  none
                                  words in pieces of <= 128 bytes (<= ~10 ms a text), on
                                                                  the request's own thread

Texts cost one encode item each whatever their length: the tokenizer cuts them at the model's
context length and every text is encoded at that length. Images cost one encode item each: they
reach the encoder as model-sized tensors. Decoding is bounded apart from encoding: at most
DECODE_THREADS images are decoded at once, one at a time per request, so the decoded pixels alive
at any moment are at most DECODE_THREADS x MAX_IMAGE_PIXELS.

Tokenizing is charged where it runs: on the request's threadpool thread, before its texts are
queued (`EncodeBatcher.tokenize`), never on the encoder thread; `common.tokenize` bounds it per
text, whatever the text, and a /classify prompt is built only as far as the tokenizer reads.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.preprocess import ImageTooLargeError, PreprocessCfg, ResizeLimit, check_image_size
from serve.errors import ApiError
from serve.settings import Settings


def resize_limit(settings: Settings, cfg: PreprocessCfg) -> ResizeLimit:
    """The bound on an image's pixels after the model's resize (`max_resized_pixels`)."""
    return ResizeLimit(cfg, settings.max_resized_pixels)


def charge_image_sizes(
    sizes: Sequence[tuple[int, int]], settings: Settings, limit: ResizeLimit
) -> None:
    """413 image_too_large if one image (decoded or resized) or all of them together are over
    their budgets; `sizes` are (width, height) from the headers."""
    for i, (width, height) in enumerate(sizes):
        try:
            check_image_size(width, height, max_pixels=settings.max_image_pixels, resize=limit)
        except ImageTooLargeError as exc:
            where = f"image {i}: " if len(sizes) > 1 else ""
            raise ApiError(413, "image_too_large", f"{where}{exc}") from None
    total = sum(width * height for width, height in sizes)
    if total > settings.max_request_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"the request's {len(sizes)} images are {total} pixels together; the limit is "
            f"{settings.max_request_pixels} (max_request_pixels)",
        )


def charge_prompts(labels: int, templates: int, settings: Settings) -> None:
    """422 validation_error if a /classify's labels x templates is over the budget."""
    prompts = labels * templates
    if prompts > settings.max_classify_prompts:
        raise ApiError(
            422,
            "validation_error",
            f"body.labels: {labels} labels x {templates} templates = {prompts} prompts to "
            "encode; the limit "
            f"is {settings.max_classify_prompts} (max_classify_prompts): send fewer, or configure "
            "a label set (DUET_LABEL_SETS), embedded once at start-up",
        )
