"""Run in a fresh process without meo_ds (argv: SPEC.json): each export's model-card snippet as
printed, and transformers' text-generation pipeline on LM exports. Prints one JSON line per spec:
{"dir", "new_tokens" (the pipeline's new pieces), "generated_text"}; the caller reads stderr.

spec: {"dir", "snippet" (the card's usage code), "task", "prompt" (LM)}.
"""
import json
import sys

sys.modules["meo_ds"] = None  # any `import meo_ds` now fails


def main():
    for spec in json.load(open(sys.argv[1])):
        result = {"dir": spec["dir"]}
        exec(compile(spec["snippet"], "card_snippet", "exec"), {})
        if spec["task"] == "lm":
            from transformers import AutoTokenizer, pipeline

            gen = pipeline("text-generation", model=spec["dir"], trust_remote_code=True)
            ids = gen(spec["prompt"], max_new_tokens=4, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
            tok = AutoTokenizer.from_pretrained(spec["dir"], trust_remote_code=True)
            result["new_tokens"] = tok.convert_ids_to_tokens(ids[len(tok(spec["prompt"]).input_ids):])
            result["generated_text"] = gen(spec["prompt"], max_new_tokens=4, do_sample=False)[0]["generated_text"]
        print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
