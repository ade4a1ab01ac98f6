"""The tools an episode offers, as the JSON schemas shown to language-model policies."""

from __future__ import annotations

from typing import Any

CROP_IMAGE: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "crop_image",
        "description": (
            "Zoom in on a region of an image: crop it and see the region at a higher resolution. "
            "Use it when details are too small to read."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "bbox_2d": {
                    "type": "array",
                    "items": {"type": "number"},
                    "minItems": 4,
                    "maxItems": 4,
                    "description": (
                        "The region [x1, y1, x2, y2]: fractions of the image width and height when all "
                        "four are below 1, otherwise pixels of the image as shown."
                    ),
                },
                "target_image": {
                    "type": "integer",
                    "description": "Which image to crop: 1 is the original image, 2 the first crop, and so on.",
                },
            },
            "required": ["bbox_2d", "target_image"],
        },
    },
}

SELECT_FRAMES: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "select_frames",
        "description": "See chosen frames of the video at full resolution (at most 8 per call).",
        "parameters": {
            "type": "object",
            "properties": {
                "target_frames": {
                    "type": "array",
                    "items": {"type": "integer"},
                    "description": "Frame numbers, starting at 1.",
                },
            },
            "required": ["target_frames"],
        },
    },
}

TOOL_SCHEMAS: tuple[dict[str, Any], ...] = (CROP_IMAGE, SELECT_FRAMES)
TOOL_NAMES: tuple[str, ...] = tuple(t["function"]["name"] for t in TOOL_SCHEMAS)
