"""Load exported models in a fresh process where meo_ds cannot be imported, and check them.

argv: SPEC.json, a list of {"dir", "task" (lm|translation), "trust_remote_code", "ref"} where
`ref` is a torch file written by the test from meo_ds's own model: {"input_ids", "logits",
"prompt", "greedy"} (LM) or {"src_ids", "src_mask", "decoder_input_ids", "logits", "greedy",
"max_new_tokens", "text", "text_ids"} (translation; text_ids: our tokenizer's ids of text + eos).
Exits non-zero (with the reason) on any mismatch; prints one line per checked export, with the
largest logit difference. Our remote code must give meo_ds's fp32 logits bit for bit (it runs the
same math files); a native transformers architecture (Mixtral, Llama) within 1e-4.
"""
import sys

sys.modules["meo_ds"] = None  # any `import meo_ds` (even the editable install) now fails

import json  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline  # noqa: E402


def check_logits(got, want, exact):
    """Largest |got - want|; fails unless equal (exact) or within 1e-4."""
    tol = 0.0 if exact else 1e-4
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    return (got.float() - want.float()).abs().max().item()


def check_lm(spec, ref):
    model = AutoModelForCausalLM.from_pretrained(spec["dir"], trust_remote_code=spec["trust_remote_code"]).eval()
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    diff = check_logits(logits, ref["logits"], exact=spec["trust_remote_code"])
    prompt = ref["prompt"]
    out = model.generate(prompt, max_new_tokens=ref["greedy"].shape[1] - prompt.shape[1], do_sample=False,
                         eos_token_id=None, attention_mask=torch.ones_like(prompt))
    assert torch.equal(out, ref["greedy"]), f"greedy tokens differ:\n{out}\n{ref['greedy']}"
    gen = pipeline("text-generation", model=spec["dir"], trust_remote_code=spec["trust_remote_code"])
    text = gen("The", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("The") and len(text) > 3, text
    return type(model).__name__, text, diff


def check_translation(spec, ref):
    model = AutoModelForSeq2SeqLM.from_pretrained(spec["dir"], trust_remote_code=spec["trust_remote_code"]).eval()
    with torch.no_grad():
        logits = model(input_ids=ref["src_ids"], attention_mask=ref["src_mask"],
                       decoder_input_ids=ref["decoder_input_ids"]).logits
    diff = check_logits(logits, ref["logits"], exact=True)
    out = model.generate(ref["src_ids"], attention_mask=ref["src_mask"], do_sample=False, num_beams=1,
                         max_new_tokens=ref["max_new_tokens"])
    assert torch.equal(out, ref["greedy"]), f"greedy tokens differ:\n{out}\n{ref['greedy']}"
    tok = AutoTokenizer.from_pretrained(spec["dir"])
    batch = tok([ref["text"] + tok.eos_token], return_tensors="pt")  # the model card's usage
    assert batch.input_ids[0].tolist() == ref["text_ids"], (batch.input_ids, ref["text_ids"])
    beams = model.generate(**batch, num_beams=4, max_new_tokens=ref["max_new_tokens"])
    return type(model).__name__, tok.decode(beams[0], skip_special_tokens=True), diff


def main():
    for spec in json.load(open(sys.argv[1])):
        ref = torch.load(spec["ref"])
        name, text, diff = (check_lm if spec["task"] == "lm" else check_translation)(spec, ref)
        print(f"OK {spec['dir']} {name} {text!r} max|logit diff|={diff:.3g}")


if __name__ == "__main__":
    main()
