//! Log-probs of completions that share prompts, each prompt run through the model once (the
//! "Prefix Grouper" of arXiv 2506.05433), for the training-side forwards of GRPO and RLOO,
//! whose G completions per prompt would otherwise each carry a copy of it.
//!
//! The full path runs R rows of [prompt + completion], [R, Tp + Tc]. Here the P distinct
//! prompts run as [P, Tp] and the completions as [R, Tc]; in every block, completion row r's
//! queries attend over the keys and values of its prompt `groups[r]` (selected from the
//! prompts' [P, K, Tp, D]) followed by its own, with the causal and padding masks of the full
//! path. Attention is causal, so a prompt's activations never depend on a completion: the
//! result is the full path's, computed on P Tp + R Tc positions instead of R (Tp + Tc). In the
//! backward pass the selection's gradient sums each prompt's gradients over its rows.
//!
//!   log p(c_{r,t}) = log_softmax(h_{r,t-1} W / temperature)[c_{r,t}],
//!   h_{r,-1} = the last prompt position of `groups[r]` (prompts are left-padded, so it is real)
//!
//! Position ids match the full path's: prompt tokens count from 0 after the left padding, a
//! completion continues at its prompt's true length, padding gets 1 (never read).
//!
//! Legend: `R` completion rows, `P` distinct prompts, `Tp` padded prompt length, `Tc` padded
//! completion length, `K` key/value heads, `D` head dim, `C` width.

use std::collections::HashMap;

use burn::tensor::{Int, Tensor, TensorData};

use crate::generate::completion_log_probs;
use crate::layers::StepInput;
use crate::model::CausalLm;

/// Completions grouped by the prompt they continue, laid out for [`shared_prefix_log_probs`].
#[derive(Debug, Clone, PartialEq)]
pub struct SharedPrefixInput {
    /// The distinct prompts, left-padded, in order of first appearance: [P, Tp].
    pub prompts: StepInput,
    /// The prompt of each completion row: [R], values below P.
    pub groups: Vec<usize>,
    /// The completion positions [R, Tc], over keys [R, Tp + Tc] (the row's prompt, then itself).
    pub completions: StepInput,
}

impl SharedPrefixInput {
    /// Groups rows by identical prompt ids. `row_prompts[r]` is row r's prompt (unpadded, at
    /// least one token); completions are right-padded to one width, `completion_mask` false at
    /// padding.
    ///
    /// # Panics
    /// When a prompt is empty, the row counts differ, or completion rows differ in width.
    pub fn new(
        row_prompts: &[&[i64]],
        completion_ids: &[Vec<i64>],
        completion_mask: &[Vec<bool>],
        pad_token_id: i64,
    ) -> Self {
        let rows = row_prompts.len();
        assert!(
            completion_ids.len() == rows && completion_mask.len() == rows,
            "one completion and mask per prompt row"
        );
        let mut index: HashMap<&[i64], usize> = HashMap::new();
        let mut distinct: Vec<&[i64]> = Vec::new();
        let groups: Vec<usize> = row_prompts
            .iter()
            .map(|&prompt| {
                assert!(
                    !prompt.is_empty(),
                    "a prompt needs at least one token: its last position predicts the first completion token"
                );
                *index.entry(prompt).or_insert_with(|| {
                    distinct.push(prompt);
                    distinct.len() - 1
                })
            })
            .collect();
        let prompt_len = distinct.iter().map(|p| p.len()).max().unwrap_or(0);
        let (padded, masks): (Vec<Vec<i64>>, Vec<Vec<bool>>) = distinct
            .iter()
            .map(|prompt| {
                let pad = prompt_len - prompt.len();
                let ids = std::iter::repeat_n(pad_token_id, pad).chain(prompt.iter().copied()).collect();
                let mask = std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, prompt.len())).collect();
                (ids, mask)
            })
            .unzip();
        let prompts = StepInput::from_padded(&padded, &masks);
        let completion_len = completion_ids.first().map_or(0, Vec::len);
        let mut input_ids = Vec::with_capacity(rows * completion_len);
        let mut position_ids = Vec::with_capacity(rows * completion_len);
        let mut key_mask = Vec::with_capacity(rows * (prompt_len + completion_len));
        for ((ids, mask), &group) in completion_ids.iter().zip(completion_mask).zip(&groups) {
            assert!(
                ids.len() == completion_len && mask.len() == completion_len,
                "completions must be padded to one width"
            );
            key_mask.extend_from_slice(&masks[group]);
            let mut real = distinct[group].len() as i64;
            for (&id, &keep) in ids.iter().zip(mask) {
                input_ids.push(id);
                // As `StepInput::from_padded`: padding gets position 1.
                position_ids.push(if keep { real } else { 1 });
                real += i64::from(keep);
                key_mask.push(keep);
            }
        }
        let completions = StepInput { batch_size: rows, input_ids, position_ids, key_mask };
        Self { prompts, groups, completions }
    }

    /// `R`.
    pub fn rows(&self) -> usize {
        self.groups.len()
    }

    /// `Tc`.
    pub fn completion_len(&self) -> usize {
        self.completions.seq_len()
    }

    /// `Tp`.
    pub fn prompt_len(&self) -> usize {
        self.prompts.seq_len()
    }

    /// Whether some rows share a prompt (P < R), i.e. whether sharing saves anything.
    pub fn shares_prompts(&self) -> bool {
        self.prompts.batch_size < self.rows()
    }

    /// Positions the shared path runs: P Tp + R Tc (the full path: R (Tp + Tc)).
    pub fn positions(&self) -> usize {
        self.prompts.batch_size * self.prompt_len() + self.rows() * self.completion_len()
    }

    /// The same rows as the full path takes them, [R, Tp + Tc]: each row's prompt left-padded
    /// to Tp, then its completion.
    pub fn full(&self) -> StepInput {
        let (tp, tc) = (self.prompt_len(), self.completion_len());
        let mut ids = Vec::with_capacity(self.rows());
        let mut masks = Vec::with_capacity(self.rows());
        for (row, &group) in self.groups.iter().enumerate() {
            let prompt = &self.prompts.input_ids[group * tp..(group + 1) * tp];
            let completion = &self.completions.input_ids[row * tc..(row + 1) * tc];
            ids.push(prompt.iter().chain(completion).copied().collect::<Vec<_>>());
            masks.push(self.completions.key_mask[row * (tp + tc)..(row + 1) * (tp + tc)].to_vec());
        }
        StepInput::from_padded(&ids, &masks)
    }
}

/// Per-token log-probs and entropies of the completions of `input` under softmax(logits /
/// temperature), each prompt run once (see the module docs); through the fused head, with
/// gradients on an autodiff device. Equal to [`completion_log_probs`] of [`SharedPrefixInput::full`],
/// which GPT-Neo takes (its local attention layers are not split at the prompt).
///
/// # Shapes
/// - returns (log_probs [R, Tc], entropies [R, Tc])
pub fn shared_prefix_log_probs(
    model: &CausalLm,
    input: &SharedPrefixInput,
    temperature: f32,
) -> (Tensor<2>, Tensor<2>) {
    let (rows, completion_len) = (input.rows(), input.completion_len());
    assert!(completion_len > 0, "there must be at least one completion position");
    let Some((prompt_hidden, completion_hidden)) =
        model.shared_prefix_hidden_states(&input.prompts, &input.groups, &input.completions)
    else {
        return completion_log_probs(model, &input.full(), completion_len, temperature);
    };
    let [prompts, prompt_len, width] = prompt_hidden.dims();
    let device = prompt_hidden.device();
    let groups = input.groups.iter().map(|&g| g as i64).collect::<Vec<_>>();
    let groups = Tensor::<1, Int>::from_data(TensorData::new(groups, [rows]), &device);
    // The hidden state at position t predicts token t + 1; the prompt's last predicts the first.
    let last = prompt_hidden.slice([0..prompts, prompt_len - 1..prompt_len, 0..width]).select(0, groups); // [R, 1, C]
    let earlier = completion_hidden.slice([0..rows, 0..completion_len - 1, 0..width]); // [R, Tc - 1, C]
    let predicting = Tensor::cat(vec![last, earlier], 1).reshape([rows * completion_len, width]);
    let targets = Tensor::<1, Int>::from_data(
        TensorData::new(input.completions.input_ids.clone(), [rows * completion_len]),
        &device,
    );
    let (log_probs, entropies) = model.token_log_probs(predicting, targets, temperature);
    (log_probs.reshape([rows, completion_len]), entropies.reshape([rows, completion_len]))
}
