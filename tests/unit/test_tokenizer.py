from transformers import CLIPTokenizer

from serve_app.model.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE, write_clip_tokenizer


def test_offline_tokenizer_matches_clip_ids(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path))
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.model_max_length == MODEL_MAX_LENGTH
    ids = tokenizer("A panda listening to music").input_ids
    # Ids of openai/clip-vit-large-patch14's tokenizer for the same text.
    assert ids == [49406, 320, 12952, 3656, 531, 1179, 49407]


def test_long_prompts_truncate_to_77(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, pad_token="!"))
    ids = tokenizer("word " * 200, truncation=True, max_length=tokenizer.model_max_length,
                    padding="max_length").input_ids
    assert len(ids) == 77
    assert tokenizer.pad_token == "!"
