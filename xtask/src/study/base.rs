//! The base policy: a checkpoint, or a preset trained here (its tokenizer, then supervised
//! fine-tuning on worked problems).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::tensor::Device;
use policy_models::optim::{AdamWSettings, Schedule};
use policy_models::presets::train_tokenizer;
use policy_models::train::{SftConfig, SftExample, SftTrainer};
use policy_models::{CausalLm, ModelSource, PolicyTokenizer};
use prompting::{PromptBuilder, sample_exemplars};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tasks::{Problem, TaskData};

use crate::common::{install_dir, partial_dir};
use crate::study::config::{PolicyBase, SftSpec, Study};
use crate::study::identity::{IDENTITY_FILE, Identity, base_config};
use crate::study::progress::Progress;
use crate::study::prompts::{encode, fit};

/// A base saved before its tokenizer carried the BOS template was trained on sequences that
/// start with its BOS all the same (its config then decided): writes the template into its
/// tokenizer.json, so its prompts keep starting with it.
pub(crate) fn add_missing_bos_template(base_dir: &Path) -> anyhow::Result<()> {
    let tokenizer = PolicyTokenizer::load_dir(base_dir)?;
    if let (None, Some(bos)) = (tokenizer.prepended_bos(), tokenizer.bos_id) {
        tokenizer.prepending_bos(bos)?.save(&base_dir.join("tokenizer.json"))?;
    }
    Ok(())
}

/// Each `#### N` line of `text` stays with probability `keep`, else becomes `The answer is N.`
/// (see `SftSpec::answer_marker_fraction`).
pub(crate) fn vary_answer_endings(text: &str, keep: f64, rng: &mut ChaCha8Rng) -> String {
    if keep >= 1.0 {
        return text.to_string();
    }
    text.split_inclusive('\n')
        .map(|line| match line.strip_prefix("#### ") {
            Some(rest) if !rng.random_bool(keep) => {
                let (answer, newline) = rest.split_at(rest.trim_end_matches('\n').len());
                format!("The answer is {answer}.{newline}")
            }
            _ => line.to_string(),
        })
        .collect()
}

/// The supervised base's training examples: packed documents of worked problems (every token
/// trained), or one problem per example with the prompt masked.
pub(crate) fn sft_examples(
    study: &Study,
    task: &TaskData,
    sft: &SftSpec,
    tokenizer: &PolicyTokenizer,
) -> anyhow::Result<Vec<SftExample>> {
    let eos = tokenizer.eos_ids[0];
    let template = study.policy.template;
    let train_count = ((task.train.len() as f64) * sft.data_fraction).round().max(1.0) as usize;
    let pool = &task.train.problems[..train_count.min(task.train.len())];
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut examples = Vec::new();
    if sft.problems_per_document > 0 {
        // Documents of 1..=n worked problems, each closed by the end-of-sequence token, packed
        // whole into sequences of at most max_length tokens (nanoGPT-style packing: no padding
        // is trained or computed). Every token after a sequence's first is trained. Enough
        // sequences that no batch repeats one.
        let sequences = (sft.steps as usize).saturating_mul(sft.batch_size).max(1);
        let mut current: Vec<i64> = Vec::new();
        while examples.len() < sequences {
            let count = rng.random_range(1..=sft.problems_per_document);
            let picks: Vec<Problem> = (0..count).map(|_| pool[rng.random_range(0..pool.len())].clone()).collect();
            let (last, context) = picks.split_last().expect("at least one problem");
            let builder = PromptBuilder::new(template).with_exemplars(context.to_vec());
            let text = format!("{}{}", builder.render(&last.question)?, builder.target(last));
            let mut document =
                encode(tokenizer, &vary_answer_endings(&text, sft.answer_marker_fraction, &mut rng), true)?;
            document.push(i64::from(eos));
            document.truncate(study.policy.max_length);
            if current.len() + document.len() > study.policy.max_length && current.len() > 1 {
                let completion_ids = current.split_off(1);
                examples.push(SftExample { prompt_ids: std::mem::take(&mut current), completion_ids });
            }
            current.extend(document);
        }
    } else {
        for problem in pool {
            // Some examples carry 1-2 exemplars, so few-shot prompts are a natural continuation.
            let k = rng.random_range(0..=2usize);
            let exemplars = sample_exemplars(&task.train, k, rng.random())?;
            let builder = PromptBuilder::new(template).with_exemplars(exemplars);
            let prompt_ids = encode(tokenizer, &builder.render(&problem.question)?, true)?;
            // The completion continues the prompt: no BOS of its own.
            let mut completion_ids = encode(
                tokenizer,
                &vary_answer_endings(&builder.target(problem), sft.answer_marker_fraction, &mut rng),
                false,
            )?;
            completion_ids.push(i64::from(eos));
            // Cut from the front, keeping the BOS, as every prompt is.
            let room = study.policy.max_length.saturating_sub(completion_ids.len());
            let prompt_ids = fit(prompt_ids, room, tokenizer.prepended_bos().map(i64::from));
            completion_ids.truncate(study.policy.max_length - prompt_ids.len().min(study.policy.max_length - 1));
            examples.push(SftExample { prompt_ids, completion_ids });
        }
    }
    Ok(examples)
}

/// Trains (or locates) the base policy; returns its checkpoint directory. A preset's base is
/// written into `.base.partial` and renamed to `base/` when complete (weights, configs,
/// tokenizer, `identity.json`), so `base/` exists only whole; `run_study` has checked the
/// identity of a `base/` already there (or removed it).
pub(crate) fn prepare_base(
    study: &Study,
    task: &TaskData,
    dir: &Path,
    device: &Device,
    progress: &Progress,
) -> anyhow::Result<PathBuf> {
    let (preset, vocab_size, sft) = match &study.policy.base {
        PolicyBase::Checkpoint { model } => return Ok(ModelSource::parse(model)?.resolve()?),
        PolicyBase::Preset { preset, vocab_size, sft } => (*preset, *vocab_size, sft),
    };
    let base_dir = dir.join("base");
    if base_dir.join(IDENTITY_FILE).is_file() {
        progress.log(format!("base policy: {} (trained earlier)", base_dir.display()));
        add_missing_bos_template(&base_dir)?;
        return Ok(base_dir);
    }
    let identity = Identity::new(base_config(study)?);
    let partial = partial_dir(&base_dir);
    let template = study.policy.template;
    let mut corpus_rng = ChaCha8Rng::seed_from_u64(1);
    let corpus = task.train.problems.iter().map(|p| {
        let builder = PromptBuilder::new(template);
        let text = format!("{}{}", builder.render(&p.question).unwrap_or_default(), builder.target(p));
        vary_answer_endings(&text, sft.answer_marker_fraction, &mut corpus_rng)
    });
    let tokenizer = train_tokenizer(corpus.collect::<Vec<_>>().into_iter(), vocab_size)?;
    let eos = tokenizer.eos_ids[0];
    // GPT-Neo's convention, bos = eos, put in front of every sequence by the tokenizer's own
    // template: training and every later prompt (in cotlab or transformers) start alike, and a
    // model that sees a fixed first token answers better at position 0.
    let tokenizer = tokenizer.prepending_bos(eos)?;
    let pad = i64::from(tokenizer.pad_id.unwrap_or(eos));
    let examples = sft_examples(study, task, sft, &tokenizer)?;
    let autodiff = device.clone().autodiff();
    autodiff.seed(0);
    let model = CausalLm::init(&preset.config(tokenizer.vocab_size(), eos, study.policy.max_length), &autodiff)
        .map_err(anyhow::Error::msg)?;
    let config = SftConfig {
        steps: sft.steps,
        batch_size: sft.batch_size,
        schedule: Schedule {
            learning_rate: sft.learning_rate,
            warmup_steps: sft.steps / 20,
            total_steps: sft.steps,
            min_lr_ratio: 0.1,
        },
        adamw: AdamWSettings::default(),
        max_grad_norm: Some(1.0),
        checkpoint_every: 0,
        seed: 0,
        pad_token_id: pad,
        max_tokens_per_micro_batch: policy_models::train::DEFAULT_MAX_TOKENS_PER_MICRO_BATCH,
        dtype: Default::default(),
    };
    let mut bar = progress.bar(sft.steps, "base policy (supervised)", 1);
    let mut trainer = SftTrainer::new(model, config);
    let history = trainer.run(&examples, None, None, |step| {
        bar.set_message(format!("loss {:.3}", step.loss));
        bar.inc(1);
    })?;
    drop(bar);
    let last = history.last().map_or(f64::NAN, |s| s.loss);
    progress.log(format!("base policy: {} supervised steps, final loss {last:.3}", history.len()));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| format!("cannot remove {}", partial.display()))?;
    }
    trainer.model().save_dir(&partial, Some(&tokenizer))?;
    // What the cells will read must encode prompts exactly as training did.
    let reloaded = PolicyTokenizer::load_dir(&partial)?;
    let probe = PromptBuilder::new(template).render(&task.test.problems[0].question)?;
    if encode(&reloaded, &probe, true)? != encode(&tokenizer, &probe, true)? {
        bail!(
            "the saved base in {} encodes prompts differently from its training (BOS/EOS settings); this is a bug in cotlab",
            partial.display()
        );
    }
    identity.write(&partial)?;
    install_dir(&partial, &base_dir)?;
    Ok(base_dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::study::run::load_task;

    #[test]
    fn answer_endings_vary_line_by_line_at_the_given_share() {
        let text = "Q: What is 2 + 3?\nA: Let's break it down.\n2 + 3 = 5\n#### 5\nQ: What is 1 - 4?\nA: Let's break it down.\n1 - 4 = -3\n#### -3";
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(vary_answer_endings(text, 1.0, &mut rng), text);
        let free = vary_answer_endings(text, 0.0, &mut rng);
        assert!(
            free.ends_with("1 - 4 = -3\nThe answer is -3.") && free.contains("2 + 3 = 5\nThe answer is 5.\nQ:"),
            "{free}"
        );
        let kept = (0..1000).filter(|_| vary_answer_endings("#### 7\n", 0.3, &mut rng) == "#### 7\n").count();
        assert!((250..350).contains(&kept), "{kept}");
    }

    /// One problem per example: the prompt starts with the tiny base's BOS (its tokenizer's
    /// template) and the completion, which continues it, does not (a completion that began with
    /// BOS = EOS taught the base to end its answers before writing them).
    #[test]
    fn supervised_completions_carry_no_bos_of_their_own() {
        let mut study: Study = toml::from_str(
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/default.toml")).unwrap(),
        )
        .unwrap();
        let PolicyBase::Preset { sft, .. } = &mut study.policy.base else {
            panic!("the default study trains a preset")
        };
        sft.problems_per_document = 0;
        sft.steps = 8;
        let sft = sft.clone();
        let task = load_task(&study).unwrap();
        let corpus = task.train.problems.iter().take(500).map(|p| format!("{} {}", p.question, p.solution));
        let tokenizer = train_tokenizer(corpus.collect::<Vec<_>>().into_iter(), 384).unwrap();
        let eos = tokenizer.eos_ids[0];
        let tokenizer = tokenizer.prepending_bos(eos).unwrap();
        let examples = sft_examples(&study, &task, &sft, &tokenizer).unwrap();
        assert!(!examples.is_empty());
        for example in &examples {
            assert_eq!(example.prompt_ids[0], i64::from(eos), "the prompt starts with the BOS");
            assert_ne!(example.completion_ids[0], i64::from(eos), "a completion starts with the BOS");
            assert_eq!(example.completion_ids.last(), Some(&i64::from(eos)), "a completion ends with EOS");
        }
    }

    #[test]
    fn a_base_saved_without_the_bos_template_gets_it_on_reuse() {
        let texts = ["Q: What is 2 + 3?\nA: 5".to_string(), "Q: What is 4 + 4?\nA: 8".to_string()];
        let trained = train_tokenizer(texts.into_iter(), 300).unwrap();
        let eos = trained.eos_ids[0];
        // As such a base was saved: no template, and its BOS named only in the configs.
        let dir = tempfile::tempdir().unwrap();
        trained.save(&dir.path().join("tokenizer.json")).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("config.json"), format!(r#"{{"bos_token_id": {eos}, "eos_token_id": {eos}}}"#))
            .unwrap();
        assert_eq!(PolicyTokenizer::load_dir(dir.path()).unwrap().prepended_bos(), None);
        add_missing_bos_template(dir.path()).unwrap();
        let upgraded = PolicyTokenizer::load_dir(dir.path()).unwrap();
        assert_eq!(upgraded.prepended_bos(), Some(eos));
        let ids = encode(&upgraded, "Q: What is 2 + 3?", true).unwrap();
        assert_eq!(ids[0], i64::from(eos));
        assert_eq!(ids[1..], encode(&upgraded, "Q: What is 2 + 3?", false).unwrap()[..]);
        // A second pass leaves it as it is.
        add_missing_bos_template(dir.path()).unwrap();
        assert_eq!(encode(&PolicyTokenizer::load_dir(dir.path()).unwrap(), "Q: What is 2 + 3?", true).unwrap(), ids);
    }
}
