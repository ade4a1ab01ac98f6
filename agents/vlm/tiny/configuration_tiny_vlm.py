"""Configuration of the tiny from-scratch VLM (`model_type` ``"pxr_tiny_vlm"``)."""

from __future__ import annotations

from dataclasses import field

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from agents.vlm.tiny.boxes import DEFAULT_BOX_SIZES, DEFAULT_GRID
from agents.vlm.tiny.frames import FrameWindows


@strict
class TinyVLMConfig(PreTrainedConfig):
    r"""The tiny VLM: a conv stem and a small bidirectional encoder per image,
    a causal decoder over text and image tokens, a tied LM head, and a pointer head that
    gives the logits of the box tokens (see `agents.vlm.tiny.boxes`).

    The defaults are the embedded default policy (about 5.8 M parameters with the
    shipped tokenizer); `build_tiny_model` fills the token ids from the tokenizer.

    Args:
        vocab_size: all tokens, box and frame-window tokens included (they are the last ones).
        hidden_size: width of the encoder, the decoder and the image tokens.
        intermediate_size: width of the SwiGLU MLPs.
        num_hidden_layers: decoder layers.
        num_attention_heads: heads in every attention layer (head size = hidden_size / heads).
        vision_num_layers: bidirectional encoder layers run on each image's tokens.
        patch_size: pixels per image token side (a multiple of 8: the stem halves it three times).
        stem_channels: channels of the stem's first conv (then x2, x4).
        stem_norm: a GroupNorm (8 groups) after each stem conv but the last. It removes
            each image's mean per channel, so the shape of a glyph is not drowned by the
            background's level (a 50-px digit was named after 250 steps with it, not
            without; docs/results.md).
        token_conv: end the stem with a 3x3 conv over the token grid, so that each image
            token sees its neighbours' patches (a glyph spanning several patches is read
            much sooner than through attention alone; docs/results.md).
        image_summary: a small conv branch over each image's token grid (two stride-2
            3x3 convs with GroupNorm, max-pooled over the image) whose vector is added to
            every token of that image. A glyph spans many tokens; the branch sees it whole,
            so any token of a crop carries what is written there (the image encoder alone
            named glyphs filling 40% of a crop at 0.94 after 200 steps with it, 0.06
            without; docs/results.md). The added vector is the same on every cell of an
            image, so the pointer's choice among cells is unchanged by it.
        pointer_grid: cells per side of the box vocabulary's grid.
        pointer_subcells: pointer keys per image token side: each image token gives
            ``pointer_subcells**2`` keys, one per part, so a pointer grid finer than the token
            grid (e.g. 28 over 14 x 14 tokens with 2) tells the cells within a token apart.
        pointer_stem: give the pointer head a conv stem of its own (the same layout as
            the image encoder's) over image 1's pixels, added to the states its keys are
            made from through a projection that starts at zero. Pointing finds a tag by
            its colour and shape while reading names its glyph; with this, the image
            encoder can be frozen after glyph pretraining and pointing still has
            trainable features (docs/results.md).
        pointer_question: gate the pointer's keys by the question: each key is multiplied
            elementwise by ``1 + W u``, where ``u`` is the decoder state of the last token
            before image 1 (the end of the question in the question-first layout of
            `agents.vlm.chat.ChatFormat`) and ``W`` starts at zero. Without it the query is
            the decoder state at the box token alone, which in a tiny model kept no trace of
            the colour the question names, and the pointer chose the same tag whatever was
            asked (docs/results.md).
        pointer_match: add to each pointer cell's logit a question-match term ``(A u) . f``:
            ``f`` from per-pixel features of image 1 (two 1x1 convs of ``stem_channels``)
            max-pooled over the cell and mixed with its neighbours (two 3x3 convs), ``u`` as
            for ``pointer_question``, ``A`` starting at zero. ``f`` is random from the start,
            so the gradient reaches ``A`` at once: unlike the gate, whose keys first need
            colour features, it binds the colour the question names to the cells holding it
            (docs/results.md).
        pointer_match_features: where the match term's ``f`` comes from: ``"pixels"`` (as
            above: colour) or ``"encoder"``, a linear map of the image encoder's token under
            each cell, for what the pixels of one cell do not show but the encoder can be
            taught to name there (e.g. the heading of the poster panel the cell lies in,
            `agents.vision_pretrain`'s ``"view"`` target on charts), or ``"both"``: the two
            terms added, each with its own ``A``.
        pointer_match_encoder: the encoder term reads an image encoder of the pointer's own
            (``pointer.match_encoder``, shaped like the model's) instead of the one the decoder
            reads, so that teaching it the page's words (`agents.vision_pretrain`'s
            ``tower="match"``) leaves what the decoder reads in crops as it was.
        bidirectional_images: in the decoder, the tokens of each image attend to each other
            both ways (the rest stays causal). Causally, an image token sees only the tokens
            above and left of it, so the pointer's key of a chart value cannot take in the
            bar below it, whose colour the question names (measured in docs/results.md).
        image_numbers: add to the decoder's tokens of the k-th image of the input (k up to
            this number; 0: off) a learned vector of k, starting at zero, as Qwen2-VL's
            rotary positions give video frames a time index. Choosing frames means writing
            the number of the frame that shows the evidence; with the number on the frame's
            own tokens, one attention hop from the answer to that token carries it (the
            ``Picture k:`` labels of `agents.vlm.chat.ChatFormat.vision_ids` need a second hop
            that first moves the label into the frame). Images are counted within one forward
            pass: a pass that holds images must hold all of the conversation's, as every
            turn of `agents.vlm.hf.TransformersPolicy` does.
        frame_windows: lengths of the runs of consecutive frames that have a token of their own
            (`agents.vlm.tiny.frames`; empty: none). Their tokens follow the box tokens, and their
            logits come from a frame pointer: each token of the input's f-th image scores
            ``q(h) . k_t / sqrt(d)`` plus a question-match term (the box pointer's, per token),
            frame f the log-sum-exp of its tokens' scores, and a window the mean of its frames'
            plus a bias per length. A window naming an image the input does not hold gets no
            mass. Written as digits, the frame choice stayed on fixed frames while the encoder
            showed the small flash (docs/results.md); the pointer reads the frames' own tokens.
        max_frames: the frames the windows span (``1..max_frames``; the initial view's frames).
        count_head: add a count to the digit tokens' logits (`TinyVLMCountHead`): the sum over
            the latest image's tokens of the probability that each holds what is asked.
        count_subcells: count-head cells per image token side: each token gives
            ``count_subcells**2`` keys, one per part, so that two counted things whose centres
            share a token are both counted (with 16-px tokens on the 112-px count crops a
            token per thing caps the exact count at 0.68 of the items, two a side at 0.99;
            docs/results.md).
        count_stem: the count head's token logits come from a conv stem of its own over each
            image's pixels, shaped by the question's tokens (`TinyVLMQuestionStem`; the question
            is read from the text before the first image, so the ``question_first`` chat layout)
            instead of a query of the decoder state against keys of the image tokens' states.
        pointer_box_stem: each box token's logit gets a term of a conv stem of the pointer's own
            over image 1's pixels, shaped by the question's tokens (`TinyVLMQuestionStem`, one
            logit per pointer cell and box size; the ``question_first`` chat layout), which can
            be pretrained apart from the decoder to put its mass on the boxes whose crops hold
            the evidence (`agents.box_stem`).
        digit_token_ids: ids of the tokens ``0`` .. ``9`` (set by `agents.vlm.tiny.tiny_config`).
        box_sizes: box sides (fractions of the image side) of the box vocabulary.
        pointer_dim: size of the pointer head's query and key vectors.
        box_token_start_id: id of the first box token; ``vocab_size - box_token_start_id``
            must be ``pointer_grid**2 * len(box_sizes)`` plus the frame-window tokens.
        box_slot_token_id: id of the token a box token follows (the `` [`` that opens a
            ``bbox_2d``); when set, box tokens get no mass after any other input token. The
            question-match term is the same at every position, so without the mask a GRPO
            run that strengthened it raised the box tokens' mass in free text (1e-5 to 0.045
            per text token) until rollouts wrote boxes into their sentences (docs/results.md).
            None (checkpoints saved before it): no mask.
        image_token_id: id of ``<|image_pad|>``, replaced by image-token embeddings.
        rope_base: base of the rotary position frequencies of the decoder.
        rms_norm_eps: epsilon of the RMS norms.
        initializer_range: standard deviation of the normal initialisation.
        max_position_embeddings: longest sequence the model is meant for.
        tie_word_embeddings: share the input embeddings with the LM head.
        use_cache: return a KV cache by default.
    """

    model_type = "pxr_tiny_vlm"

    vocab_size: int = 2614
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    vision_num_layers: int = 2
    patch_size: int = 16
    stem_channels: int = 32
    stem_norm: bool = False
    token_conv: bool = False
    image_summary: bool = False
    pointer_grid: int = DEFAULT_GRID
    pointer_subcells: int = 1
    pointer_stem: bool = False
    pointer_question: bool = False
    pointer_match: bool = False
    pointer_match_features: str = "pixels"
    pointer_match_encoder: bool = False
    bidirectional_images: bool = False
    image_numbers: int = 0
    frame_windows: list[int] = field(default_factory=list)
    max_frames: int = 16
    count_head: bool = False
    count_subcells: int = 1
    count_stem: bool = False
    pointer_box_stem: bool = False
    digit_token_ids: list[int] = field(default_factory=list)
    box_sizes: list[float] = field(default_factory=lambda: list(DEFAULT_BOX_SIZES))
    pointer_dim: int = 64
    box_token_start_id: int | None = None
    box_slot_token_id: int | None = None
    image_token_id: int | None = None
    rope_base: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def num_boxes(self) -> int:
        """Number of box tokens (cells x sizes)."""
        return self.pointer_grid * self.pointer_grid * len(self.box_sizes)

    @property
    def num_frame_tokens(self) -> int:
        """Number of frame-window tokens (0 without `frame_windows`)."""
        return sum(self.max_frames - n + 1 for n in self.frame_windows)

    @property
    def frame_token_start_id(self) -> int | None:
        """Id of the first frame-window token: right after the box tokens."""
        return None if self.box_token_start_id is None else self.box_token_start_id + self.num_boxes

    def validate_architecture(self) -> None:
        """Check the shapes fit together (run by ``@strict`` on construction)."""
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(
                f"hidden_size {self.hidden_size} must split into {self.num_attention_heads} heads of even size"
            )
        if self.stem_norm and (self.stem_channels % 8 or self.hidden_size % 8):
            raise ValueError(f"stem_norm needs stem_channels and hidden_size divisible by 8 (its groups), "
                             f"got {self.stem_channels}, {self.hidden_size}")
        if self.image_summary and self.hidden_size % 8:
            raise ValueError(f"image_summary needs hidden_size divisible by 8 (its GroupNorm groups), got {self.hidden_size}")
        if self.pointer_match_features not in ("pixels", "encoder", "both"):
            raise ValueError(f"pointer_match_features must be 'pixels', 'encoder' or 'both', "
                             f"got {self.pointer_match_features!r}")
        if self.pointer_match_encoder and not (self.pointer_match and self.pointer_match_features != "pixels"):
            raise ValueError("pointer_match_encoder needs pointer_match with pointer_match_features 'encoder' or 'both'")
        if self.image_numbers < 0:
            raise ValueError(f"image_numbers must be 0 (off) or a positive count, got {self.image_numbers}")
        if self.pointer_subcells < 1:
            raise ValueError(f"pointer_subcells must be at least 1, got {self.pointer_subcells}")
        if self.count_subcells < 1:
            raise ValueError(f"count_subcells must be at least 1, got {self.count_subcells}")
        if self.count_stem and not self.count_head:
            raise ValueError("count_stem is a part of the count head: set count_head too")
        for name in ("count_stem", "pointer_box_stem"):
            if getattr(self, name) and (self.stem_channels % 8 or self.hidden_size % 8):
                raise ValueError(f"{name} needs stem_channels and hidden_size divisible by 8 (its GroupNorm "
                                 f"groups), got {self.stem_channels}, {self.hidden_size}")
        if self.patch_size % 8:
            raise ValueError(f"patch_size must be a multiple of 8 (the stem halves it three times), got {self.patch_size}")
        if self.frame_windows:
            FrameWindows(tuple(self.frame_windows), self.max_frames)  # checks the lengths
        pointer_tokens = self.num_boxes + self.num_frame_tokens
        if self.box_token_start_id is not None and self.vocab_size - self.box_token_start_id != pointer_tokens:
            raise ValueError(
                f"the box tokens ({self.pointer_grid}^2 cells x {len(self.box_sizes)} sizes) and then the "
                f"{self.num_frame_tokens} frame-window tokens must be the last {pointer_tokens} ids: vocab_size "
                f"{self.vocab_size} - box_token_start_id {self.box_token_start_id} = "
                f"{self.vocab_size - self.box_token_start_id}"
            )
