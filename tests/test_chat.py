"""The chat layer: Qwen2-VL rendering, the tool system prompt, continuation segments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.vlm.chat import INSTRUCTION, Conversation, render_messages, system_prompt
from pxr_env.tools import TOOL_SCHEMAS

IMG = np.zeros((224, 224, 3), np.uint8)
CROP = np.full((224, 196, 3), 9, np.uint8)
CALL = '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.2, 0.3, 0.4], "target_image": 1}}\n</tool_call>'
QUESTION = "What digit is written on the red square?"
CROP_TEXT = "Here is the cropped image (image 2, 224x196 px):"

EXPECTED = (
    "<|im_start|>system\nSYS<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What digit is written on the red square?<|im_end|>\n"
    "<|im_start|>assistant\nI need to look closer.\n"
    '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.2, 0.3, 0.4], "target_image": 1}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nHere is the cropped image (image 2, 224x196 px):<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    "<|im_start|>assistant\nThe digit is 7. \\boxed{7}<|im_end|>\n"
)


def _episode(first_turn_closed: bool) -> tuple[Conversation, list[str]]:
    conv = Conversation(system="SYS")
    stream = [conv.add_observation({"text": QUESTION, "images": (IMG,)})]
    turn = "I need to look closer.\n" + CALL + ("<|im_end|>" if first_turn_closed else "")
    conv.add_assistant(turn)
    stream.append(turn)
    stream.append(conv.add_observation({"text": CROP_TEXT, "images": (CROP,)}))
    return conv, stream


def test_two_turn_episode_renders_exactly():
    conv, _ = _episode(first_turn_closed=False)
    conv.add_assistant("The digit is 7. \\boxed{7}<|im_end|>")
    rendered = conv.render(add_generation_prompt=False)
    for i, (got, want) in enumerate(zip(rendered.splitlines(), EXPECTED.splitlines())):
        assert got == want, f"line {i} differs"
    assert rendered == EXPECTED
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": QUESTION}]
    assert conv.messages[3]["content"] == [{"type": "text", "text": CROP_TEXT}, {"type": "image"}]
    assert [im.shape for im in conv.images] == [IMG.shape, CROP.shape]
    assert conv.num_turns == 2


@pytest.mark.parametrize("closed", [False, True])
def test_segments_concatenate_to_the_render(closed: bool):
    conv, stream = _episode(first_turn_closed=closed)
    assert "".join(stream) == conv.render()
    assert stream[2].startswith("\n<|im_start|>user\n" if closed else "<|im_end|>\n<|im_start|>user\n")
    assert stream[2].endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert stream[0].startswith("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<|vision_start|>")


def test_error_observation_is_text_only_and_video_frames_come_first():
    conv = Conversation(system="SYS")
    frames = tuple(np.full((112, 112, 3), i, np.uint8) for i in range(3))
    first = conv.add_observation({"text": "The video has 3 frames.", "images": frames})
    assert first.count("<|image_pad|>") == 3
    assert first.index("<|image_pad|>") < first.index("The video has")
    conv.add_assistant("<tool_call>\n{oops\n</tool_call>")
    segment = conv.add_observation({"text": "Execution error: tool call is not valid JSON", "images": ()})
    assert segment == ("<|im_end|>\n<|im_start|>user\nExecution error: tool call is not valid JSON<|im_end|>\n"
                       "<|im_start|>assistant\n")
    assert len(conv.images) == 3


def test_turn_order_and_observation_shape_are_checked():
    conv = Conversation()
    with pytest.raises(ValueError, match="add_observation"):
        conv.add_assistant("hi")
    conv.add_observation({"text": "q", "images": (IMG,)})
    with pytest.raises(ValueError, match="add_assistant"):
        conv.add_observation({"text": "q", "images": ()})
    conv.add_assistant("x")
    with pytest.raises(ValueError, match="uint8"):
        conv.add_observation({"text": "q", "images": (IMG.astype(np.float32),)})
    with pytest.raises(ValueError, match="text-mode dict"):
        conv.add_observation("q")


def test_system_prompt_is_the_qwen_tool_layout():
    prompt = system_prompt()
    lines = prompt.split("\n")
    assert lines[0] == INSTRUCTION
    assert lines[1:8] == [
        "", "# Tools", "", "You may call one or more functions to assist with the user query.", "",
        "You are provided with function signatures within <tools></tools> XML tags:", "<tools>",
    ]
    assert [json.loads(line) for line in lines[8:10]] == list(TOOL_SCHEMAS)
    assert lines[8] == json.dumps(TOOL_SCHEMAS[0])
    assert lines[10:] == [
        "</tools>", "",
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:",
        "<tool_call>", '{"name": <function-name>, "arguments": <args-json-object>}', "</tool_call>",
    ]
    assert "\\boxed{}" in INSTRUCTION and "<tool_call></tool_call>" in INSTRUCTION


def test_default_system_message_when_none_is_given():
    text = render_messages([{"role": "user", "content": "hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("question_first", [False, True])
def test_vision_ids_number_the_images_across_turns_as_the_chat_template_does(question_first: bool, tmp_path):
    from jinja2 import Template

    from agents.vlm.chat import QWEN2_VL_CHAT_TEMPLATE, ChatFormat, load_chat_format, save_chat_format

    chat = ChatFormat(system="SYS", question_first=question_first, vision_ids=True)
    conv = chat.conversation()
    frames = tuple(np.full((112, 112, 3), i, np.uint8) for i in range(3))
    stream = [conv.add_observation({"text": "The video has 3 frames.", "images": frames})]
    turn = '<tool_call>\n{"name": "select_frames", "arguments": {"target_frames": [2]}}\n</tool_call>'
    conv.add_assistant(turn)
    stream += [turn, conv.add_observation({"text": "Here is frame 2:", "images": (IMG,)})]
    rendered = conv.render()
    assert "".join(stream) == rendered
    assert rendered == Template(QWEN2_VL_CHAT_TEMPLATE).render(messages=conv.messages, add_generation_prompt=True,
                                                               add_vision_id=True)
    labels = [f"Picture {k}: <|vision_start|>" for k in (1, 2, 3, 4)]
    assert [rendered.count(label) for label in labels] == [1, 1, 1, 1]
    assert rendered.index(labels[2]) < rendered.index(turn) < rendered.index(labels[3])
    assert "Picture" not in ChatFormat(system="SYS").conversation().add_observation({"text": "q", "images": frames})
    assert load_chat_format(save_chat_format(chat, tmp_path).parent) == chat
    (tmp_path / "chat_format.json").write_text('{"vision_id": true}')
    with pytest.raises(ValueError, match="unknown keys"):
        load_chat_format(tmp_path)


def test_unknown_content_items_are_refused():
    with pytest.raises(ValueError, match="cannot render content item of type 'audio'"):
        render_messages([{"role": "user", "content": [{"type": "audio"}]}])
