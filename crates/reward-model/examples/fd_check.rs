use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Device, Tensor, TensorData};
use policy_models::presets::train_tokenizer;
use prompting::Template;
use reward_model::comparisons::Comparison;
use reward_model::train::RewardTokenizer;
use reward_model::{RobertaConfig, RobertaRegressor};
use tasks::synthetic::{Operator, SyntheticConfig, generate};

fn loss(model: &RobertaRegressor, tok: &RewardTokenizer, pairs: &[Comparison], which: &str) -> Tensor<1> {
    let texts: Vec<_> = pairs.iter().flat_map(|p| [(p.prompt.as_str(), p.chosen.as_str(), None), (p.prompt.as_str(), p.rejected.as_str(), p.rejected_error.as_ref())]).collect();
    let (ids, masks, labels) = tok.batch_labelled(&texts);
    let hidden = model.encode(&ids, &masks);
    if which == "bt" {
        let s = model.score_hidden(hidden).reshape([pairs.len(), 2]);
        let m = s.clone().slice([0..pairs.len(), 0..1]) - s.slice([0..pairs.len(), 1..2]);
        return -log_sigmoid(m).sum().reshape([1]);
    }
    let logits = model.token_logits(hidden).unwrap();
    let [rows, length] = logits.dims();
    let device = logits.device();
    let lab: Vec<f32> = labels.iter().flatten().map(|&l| if l { 1.0 } else { 0.0 }).collect();
    let w: Vec<f32> = masks.iter().flat_map(|row| { let n = row.iter().filter(|m| **m).count() as f32; row.iter().map(move |&m| if m { 1.0 / n } else { 0.0 }) }).collect();
    let lab = Tensor::<2>::from_data(TensorData::new(lab, [rows, length]), &device);
    let w = Tensor::<2>::from_data(TensorData::new(w, [rows, length]), &device);
    let per = -(lab.clone() * log_sigmoid(logits.clone()) + (lab.neg() + 1.0) * log_sigmoid(logits.neg()));
    (per * w).sum()
}

struct Collect<'a> { grads: &'a GradientsParams, out: Vec<(ParamId, Vec<f32>)> }
impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let g = self.grads.get::<D>(param.id).map(|g| g.into_data().try_to_vec::<f32>().unwrap()).unwrap_or_default();
        self.out.push((param.id, g));
    }
}
struct Nudge { id: ParamId, index: usize, eps: f32 }
impl ModuleMapper for Nudge {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if param.id != self.id { return param; }
        let (id, index, eps) = (self.id, self.index, self.eps);
        param.map(move |t| {
            let _ = id;
            let device = t.device();
            let shape = t.shape();
            let mut v = t.into_data().try_to_vec::<f32>().unwrap();
            v[index] += eps;
            Tensor::from_data(TensorData::new(v, shape), &device).require_grad()
        })
    }
}

fn main() {
    let task = generate(&SyntheticConfig { operators: vec![Operator::Add, Operator::Sub], min_operand: 1, max_operand: 9, min_operations: 1, max_operations: 2, max_depth: 2, train_size: 400, test_size: 40, seed: 0 }).unwrap();
    let corpus: Vec<String> = task.train.problems.iter().map(|p| format!("{}\n{}", p.question, Template::Plain.response(p))).collect();
    let tokenizer = train_tokenizer(corpus.into_iter(), 160).unwrap();
    let pairs = reward_model::comparisons::build_comparisons(&task.train, Template::Plain, 2, 0)[..6].to_vec();
    let device = Device::flex().autodiff();
    device.seed(3);
    let config = RobertaConfig::tiny(tokenizer.vocab_size(), tokenizer.pad_id.unwrap(), 16, 1, 120);
    let tok = RewardTokenizer::new(tokenizer, config.max_tokens());
    let model = RobertaRegressor::init(&config, &device).with_token_head();
    for which in ["token", "bt"] {
        let l = loss(&model, &tok, &pairs, which);
        let grads = GradientsParams::from_grads(l.backward(), &model);
        let mut c = Collect { grads: &grads, out: vec![] };
        model.visit(&mut c);
        let mut worst = 0f32;
        for (pi, (id, g)) in c.out.iter().enumerate() {
            if g.is_empty() { println!("{which}: param {pi} has no gradient"); continue; }
            for k in 0..3 {
                let index = (k * 7919 + pi * 31) % g.len();
                let eps = 1e-2;
                let plus = loss(&model.clone().map(&mut Nudge { id: *id, index, eps }), &tok, &pairs, which).into_scalar::<f32>();
                let minus = loss(&model.clone().map(&mut Nudge { id: *id, index, eps: -eps }), &tok, &pairs, which).into_scalar::<f32>();
                let fd = (plus - minus) / (2.0 * eps);
                let err = (fd - g[index]).abs() / (1e-3 + fd.abs().max(g[index].abs()));
                if err > worst { worst = err; }
                if err > 0.05 { println!("{which}: param {pi} [{}] index {index}: autodiff {} fd {}", g.len(), g[index], fd); }
            }
        }
        println!("{which}: worst relative error {worst}");
    }
}
