"""Beyond the paper: on-policy steps (--student-gen-ratio, METHOD.md section 6). On a share of the
steps the student answers the batch's prompts itself, and KD is taken on its own responses (the
teacher grades them); CE stays on the fixed responses. The paper trains off-policy only: with the
ratio at 0 (the default) `kd_examples` returns the batch's own examples and nothing here runs.
"""
import random

import torch

import data
import distributed


def kd_examples(args, student, examples, example_ids, step, tokenizer):
    """The examples KD is taken on at this step: `examples` itself (off-policy, the paper's step),
    or on an on-policy step the student's own response to each example's prompt, as
    [(prompt_ids, response_ids + [EOS])] like the fixed examples.

    Whether a step is on-policy is one seeded draw per global batch, a function of (seed, step)
    alone: every process draws the same, and the step saved in last.pt is all a resumed run needs
    to draw it again. Responses are sampled without gradient at temperature 1 (the protocol's
    decoding, no n-gram block) up to --max-len - --max-prompt-len tokens and cut at EOS. Each row
    draws from its own generator, seeded by (seed, step, example index), so a response does not
    depend on the process or micro-batch its example falls in."""
    step_key = args.seed * 1_000_003 + step  # seeds this step's draw and its rows' generators
    draw = random.Random(step_key).random()
    if args.mode != "kd" or not draw < args.student_gen_ratio:
        return examples
    model = student.for_sampling()
    device = next(model.parameters()).device
    prompts = [prompt for prompt, _ in examples]
    input_ids, attention_mask = data.collate_prompts(prompts, tokenizer.pad_id)
    generators = [torch.Generator(device).manual_seed(step_key * 100_003 + i) for i in example_ids]
    eos = tokenizer.eos_id
    with torch.no_grad():
        new = model.eval().generate(input_ids.to(device), attention_mask.to(device),
                                    max_new_tokens=args.max_len - args.max_prompt_len, eos_token_id=eos,
                                    generator=generators, allowed=tokenizer.token_mask(model.cfg.vocab_size))
    model.train()
    return [(prompt, row[:row.index(eos) + 1] if eos in row else row) for prompt, row in zip(prompts, new.tolist())]


def stats(examples, kd_examples, state):
    """What the log says of on-policy training: was this step on-policy, the share of such steps so
    far (counted in `state`, so in last.pt), and the mean length in tokens of the sampled responses
    (EOS included)."""
    on_policy = kd_examples is not examples
    sampled = kd_examples if on_policy else []
    state["on_policy_steps"] = state.get("on_policy_steps", 0) + on_policy
    lengths, = distributed.all_sum(torch.tensor([float(sum(len(r) for _, r in sampled)), float(len(sampled))]))
    return {"on_policy": on_policy, "on_policy_share": state["on_policy_steps"] / (state["step"] + 1),
            "sampled_len": float(lengths[0] / lengths[1]) if lengths[1] else None}
