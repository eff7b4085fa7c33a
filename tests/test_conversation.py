from legion.model.conversation import GCG_QUESTION, parse_answer, render_conversation, render_prompt, tag_phrase


def test_prompt_is_verbatim_llava_v1():
    prompt = render_prompt()
    assert prompt.startswith(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions. "
        "USER: The <im_start><image><im_end> provides an overview of the picture.\n"
    )
    assert prompt.endswith(GCG_QUESTION + " ASSISTANT:")
    assert render_conversation("x") == prompt + " x</s>"


def test_parse_answer_keeps_unknown_angle_text():
    text = (
        f"ASSISTANT: Upon examining. {tag_phrase('Man' + chr(39) + 's ear.')}:The ear <b> is off."
        f"{tag_phrase('eyes')}:Uneven.</s>"
    )
    explanation, phrases = parse_answer(text)
    assert phrases == ["Man's ear.", "eyes"]
    # as the reference cleans it: tags removed, the space they leave before ':' kept; `<b>` is not ours, so kept
    assert explanation == "Upon examining. Man's ear. :The ear <b> is off. eyes :Uneven."


def test_to_glamm_ids_moves_only_special_tokens():
    import torch

    from legion.model.builders import tiny_tokenizer
    from legion.model.conversation import GLAMM_SPECIAL_TOKEN_IDS, SEG, to_glamm_ids

    tok = tiny_tokenizer()
    ids = torch.tensor(tok("a <p> b </p> [SEG]", add_special_tokens=False).input_ids)
    moved = to_glamm_ids(ids, tok, 32007)
    seg = ids == tok.convert_tokens_to_ids(SEG)
    assert seg.any() and (moved[seg] == GLAMM_SPECIAL_TOKEN_IDS[SEG]).all()
    special = torch.tensor([int(i) in set(tok.convert_tokens_to_ids(list(GLAMM_SPECIAL_TOKEN_IDS))) for i in ids])
    assert torch.equal(moved[~special], ids[~special])
    assert torch.equal(to_glamm_ids(ids, tok, len(tok)), ids)
