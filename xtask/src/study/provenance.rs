//! `reports/<study>/provenance.json`: what a study's results came from. cotlab's commit, the
//! machine (backend, threads, CPU and its features), and every model and data file the study
//! read, each with its size and sha256 and, for a hub file, the commit its revision resolved
//! to. Two reports with the same provenance came from the same bytes; a report without it
//! cannot say which `main` of a hub repository it read.

use std::path::{Path, PathBuf};

use anyhow::Context;
use policy_models::ModelSource;
use serde::{Deserialize, Serialize};
use tasks::Split;

use crate::common::write_atomically;
use crate::study::config::{PolicyBase, RewardModelSpec, Study, TaskSpec};

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provenance {
    /// The cotlab build that ran the study.
    pub cotlab: Build,
    /// Where it ran.
    pub machine: Machine,
    /// Every model and data file read, by role.
    pub inputs: Vec<Input>,
}

/// The cotlab build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Build {
    /// The crate version.
    pub version: String,
    /// `git rev-parse HEAD` of the source tree when the study ran (the checkout the binary
    /// was compiled in, which `cargo xtask` rebuilds from first); absent outside a git checkout.
    pub commit: Option<String>,
    /// Whether that tree had uncommitted changes (`git status --porcelain` printed anything):
    /// then the commit alone does not reproduce the run.
    pub modified: Option<bool>,
    /// `debug` or `release` (timings differ by an order of magnitude).
    pub profile: String,
}

/// The machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// The study's burn backend (`flex`, `wgpu`, `cuda`).
    pub backend: String,
    /// Threads of the CPU kernels (rayon's pool: `RAYON_NUM_THREADS`, else the cores).
    pub threads: usize,
    /// The CPU's model name (`/proc/cpuinfo`), where the OS says.
    pub cpu: Option<String>,
    /// The SIMD features detected at run time that cotlab's kernels and burn's dispatch on.
    pub cpu_features: Vec<String>,
    /// `linux-x86_64` and the like.
    pub os: String,
}

/// One input of the study: a model, a reward model or a data split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Input {
    /// `policy.base`, `reward_model`, `task.train`, `task.test`.
    pub role: String,
    /// The study file's reference (a path, a hub id with its revision, or what produced it).
    pub reference: String,
    /// The commit a hub revision resolved to (the snapshot the files came from).
    pub resolved_commit: Option<String>,
    /// The files read.
    pub files: Vec<FileDigest>,
}

/// A file and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Its path as read.
    pub path: PathBuf,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256, hex.
    pub sha256: String,
}

/// The files a Hugging Face checkpoint directory is read from (configuration, tokenizer, chat
/// template, weights), those present.
const CHECKPOINT_FILES: [&str; 10] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "model.safetensors",
];

fn digest(path: &Path) -> anyhow::Result<FileDigest> {
    let bytes = std::fs::metadata(path).with_context(|| format!("provenance: cannot read {}", path.display()))?.len();
    let sha256 = policy_models::model::file_sha256(path)
        .with_context(|| format!("provenance: cannot hash {}", path.display()))?;
    Ok(FileDigest { path: path.to_path_buf(), bytes, sha256 })
}

/// The digests of the files of checkpoint directory `dir` (the shards of a sharded one included).
pub fn checkpoint_files(dir: &Path) -> anyhow::Result<Vec<FileDigest>> {
    let mut files: Vec<PathBuf> =
        CHECKPOINT_FILES.iter().map(|name| dir.join(name)).filter(|path| path.is_file()).collect();
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        files.extend(policy_models::weights::shard_files(&index)?.into_iter().map(|name| dir.join(name)));
        files.push(index);
    }
    files.iter().map(|path| digest(path)).collect()
}

/// The hub commit of a file or directory in the hub cache: the `<commit>` of
/// `.../snapshots/<commit>/...`, which is what a branch or tag resolved to when it was fetched.
pub fn hub_commit(path: &Path) -> Option<String> {
    let mut components = path.components().map(|c| c.as_os_str().to_string_lossy().to_string());
    components.by_ref().find(|c| c == "snapshots")?;
    components.next().filter(|commit| commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit()))
}

/// A model `reference` as the study resolved it, and its files. A GGUF file is the file
/// itself (its cached conversion is a function of it and cotlab's commit).
fn model_input(role: &str, reference: &str) -> anyhow::Result<Input> {
    let source = ModelSource::parse(reference)?;
    let (files, resolved_commit) = match &source {
        ModelSource::Gguf(path) => (vec![digest(path)?], None),
        ModelSource::Dir(dir) => (checkpoint_files(dir)?, None),
        ModelSource::Hub { .. } => {
            let dir = source.resolve()?;
            (checkpoint_files(&dir)?, hub_commit(&dir))
        }
    };
    Ok(Input { role: role.to_string(), reference: reference.to_string(), resolved_commit, files })
}

/// The inputs of `study`: its task's data files, its base (a checkpoint read, or the preset base
/// it trained, in `base_dir`) and its reward model's starting checkpoint, when one is read.
pub fn inputs(study: &Study, base_dir: &Path) -> anyhow::Result<Vec<Input>> {
    let mut inputs = Vec::new();
    if let TaskSpec::Gsm8k { source, .. } = &study.task {
        let reference = match source {
            tasks::gsm8k::Gsm8kSource::Hub { repo, revision } => format!("{repo}@{revision}"),
            tasks::gsm8k::Gsm8kSource::Path(path) => path.display().to_string(),
            tasks::gsm8k::Gsm8kSource::Files { train, test } => {
                format!("train {}, test {}", train.display(), test.display())
            }
        };
        for split in [Split::Train, Split::Test] {
            let file = tasks::gsm8k::split_file(source, split)?;
            inputs.push(Input {
                role: format!("task.{split}"),
                reference: reference.clone(),
                resolved_commit: hub_commit(&file),
                files: vec![digest(&file)?],
            });
        }
    }
    match &study.policy.base {
        PolicyBase::Checkpoint { model } => inputs.push(model_input("policy.base", model)?),
        // Not an input but the study's own product; hashed so a report names the base it used.
        PolicyBase::Preset { preset, .. } => inputs.push(Input {
            role: "policy.base".to_string(),
            reference: format!("preset {preset:?} trained by this study"),
            resolved_commit: None,
            files: checkpoint_files(base_dir)?,
        }),
    }
    let reward_model_used = study.reward_sources.values().any(|source| source.reward_model_weight.is_some());
    if let (
        true,
        Some(RewardModelSpec::Checkpoint { model, .. } | RewardModelSpec::CausalLm { model: Some(model), .. }),
    ) = (reward_model_used, &study.reward_model)
    {
        inputs.push(model_input("reward_model", model)?);
    }
    Ok(inputs)
}

/// The build: version, and the commit of the source tree when it is a git checkout.
pub fn build() -> Build {
    let tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&tree)
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).to_string())
    };
    let commit = git(&["rev-parse", "HEAD"]).map(|text| text.trim().to_string());
    let modified = commit
        .as_ref()
        .and_then(|_| git(&["status", "--porcelain", "--untracked-files=no"]))
        .map(|text| !text.trim().is_empty());
    Build {
        version: env!("CARGO_PKG_VERSION").to_string(),
        commit,
        modified,
        profile: if cfg!(debug_assertions) { "debug" } else { "release" }.to_string(),
    }
}

/// The SIMD features of this CPU that matter to the kernels (x86-64; none listed elsewhere).
pub fn cpu_features() -> Vec<String> {
    #[allow(unused_mut, reason = "filled on x86-64 only")]
    let mut features = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! detect {
            ($($name:tt),*) => {
                $(if std::arch::is_x86_feature_detected!($name) { features.push($name.to_string()); })*
            };
        }
        detect!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512bf16", "avx512fp16");
        // AMX's detection macro is unstable in std; the kernel's flag list says it as well.
        let amx = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|text| {
            text.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "amx_bf16"))
        });
        if amx {
            features.push("amx-bf16".to_string());
        }
    }
    features
}

/// Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), as PyTorch's oneDNN kernels
/// then do. Without them PyTorch's bf16 product is far slower than its f32 one. cotlab's own
/// bf16 product ([`policy_models::bf16_gemm`]) needs AVX-512 BF16 (which AMX CPUs have too);
/// elsewhere flex computes bf16 products in f32 between two conversions.
pub fn native_bf16(features: &[String]) -> bool {
    features.iter().any(|f| f == "avx512bf16" || f == "amx-bf16")
}

/// The CPU's model name in `/proc/cpuinfo`, where the OS says.
pub fn cpu_model() -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|text| {
        text.lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split_once(':'))
            .map(|(_, name)| name.trim().to_string())
    })
}

fn machine(study: &Study) -> Machine {
    Machine {
        backend: study.backend.to_string(),
        threads: rayon::current_num_threads(),
        cpu: cpu_model(),
        cpu_features: cpu_features(),
        os: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
    }
}

/// Writes `dir/provenance.json` for `study`, whose base is in `base_dir`.
pub fn write(dir: &Path, study: &Study, base_dir: &Path) -> anyhow::Result<Provenance> {
    let provenance = Provenance { cotlab: build(), machine: machine(study), inputs: inputs(study, base_dir)? };
    write_atomically(&dir.join("provenance.json"), serde_json::to_string_pretty(&provenance)?.as_bytes())?;
    Ok(provenance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_commits_come_from_the_snapshot_directory() {
        let commit = "7ae557604adf67be50417f59c2c2f167def9a775";
        let path = PathBuf::from(format!("/c/hub/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/{commit}/config.json"));
        assert_eq!(hub_commit(&path).as_deref(), Some(commit));
        assert_eq!(hub_commit(path.parent().unwrap()).as_deref(), Some(commit));
        assert_eq!(hub_commit(Path::new("/data/snapshots/latest/config.json")), None, "not a commit");
        assert_eq!(hub_commit(Path::new("../shared/models/x.gguf")), None);
    }

    /// The digests are the files' sha256 (checked against `sha256sum`'s list in ../shared), and a
    /// checkpoint directory lists the files it is read from, not others beside them.
    #[test]
    fn inputs_name_every_file_read_with_its_sha256() {
        let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
        let sums = std::fs::read_to_string(shared.join("tokenizers/SHA256SUMS")).unwrap();
        let files = checkpoint_files(&shared.join("tokenizers/smollm2-instruct")).unwrap();
        let names: Vec<String> =
            files.iter().map(|f| f.path.file_name().unwrap().to_string_lossy().to_string()).collect();
        assert_eq!(names, ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]);
        for file in &files {
            let name = file.path.file_name().unwrap().to_string_lossy().to_string();
            let line = sums
                .lines()
                .find(|line| line.ends_with(&format!("smollm2-instruct/{name}")))
                .unwrap_or_else(|| panic!("{name} not in SHA256SUMS"));
            assert_eq!(line.split_whitespace().next().unwrap(), file.sha256, "{name}");
            assert_eq!(file.bytes, std::fs::metadata(&file.path).unwrap().len());
        }
    }

    /// A GSM8K study from two local files: both splits are inputs with their own digests, and a
    /// checkpoint base is hashed where it lies.
    #[test]
    fn a_gsm8k_study_lists_its_split_files_and_its_checkpoint() {
        let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
        let gsm8k = shared.join("datasets/gsm8k");
        let train = std::fs::read_dir(&gsm8k).unwrap().map(|e| e.unwrap().path()).find(|p| {
            p.file_name().unwrap().to_string_lossy().starts_with("train") && p.extension().is_some_and(|e| e == "jsonl")
        });
        let test = std::fs::read_dir(&gsm8k).unwrap().map(|e| e.unwrap().path()).find(|p| {
            p.file_name().unwrap().to_string_lossy().starts_with("test") && p.extension().is_some_and(|e| e == "jsonl")
        });
        let (Some(train), Some(test)) = (train, test) else {
            panic!("../shared/datasets/gsm8k has train*.jsonl and test*.jsonl")
        };
        let text = format!(
            "name = \"p\"\n[task]\nkind = \"gsm8k\"\nsource = {{ files = {{ train = {:?}, test = {:?} }} }}\n[policy]\ntemplate = \"plain\"\n[policy.base]\nkind = \"checkpoint\"\nmodel = {:?}\n[reward_sources.rules]\nrules = [{{ kind = \"strict_correct\", format = \"gsm8k_marker\" }}]\n[methods.few]\nkind = \"few_shot\"\nk = 2\n",
            train.display().to_string(),
            test.display().to_string(),
            shared.join("tokenizers/smollm2-instruct").display().to_string()
        );
        let study: Study = toml::from_str(&text).unwrap();
        let inputs = inputs(&study, Path::new("unused")).unwrap();
        let roles: Vec<&str> = inputs.iter().map(|input| input.role.as_str()).collect();
        assert_eq!(roles, ["task.train", "task.test", "policy.base"]);
        assert_eq!(inputs[0].files[0].path, train);
        assert_eq!(inputs[1].files[0].path, test);
        assert_ne!(inputs[0].files[0].sha256, inputs[1].files[0].sha256);
        assert_eq!(inputs[0].files[0].sha256, policy_models::model::file_sha256(&train).unwrap());
        assert_eq!(inputs[2].files.len(), 4);
    }

    #[test]
    fn the_machine_and_build_are_described() {
        let study: Study = toml::from_str(
            "name = \"p\"\n[task]\nkind = \"synthetic\"\n[policy]\ntemplate = \"plain\"\n[policy.base]\nkind = \"preset\"\npreset = \"tiny_gpt_neo\"\n[reward_sources.rules]\nrules = [{ kind = \"strict_correct\", format = \"gsm8k_marker\" }]\n[methods.base]\nkind = \"base\"\n",
        )
        .unwrap();
        let machine = machine(&study);
        assert_eq!(machine.backend, "flex");
        assert!(machine.threads >= 1);
        #[cfg(target_arch = "x86_64")]
        assert!(
            machine.cpu_features.iter().any(|f| f == "sse4.2"),
            "every x86-64 machine this runs on has SSE4.2: {:?}",
            machine.cpu_features
        );
        let build = build();
        assert_eq!(build.version, env!("CARGO_PKG_VERSION"));
        // A checkout (CI clones one) knows its commit.
        if Path::new(env!("CARGO_MANIFEST_DIR")).join("../.git").exists() {
            let commit = build.commit.expect("a commit in a git checkout");
            assert!(commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit()), "{commit}");
            assert!(build.modified.is_some());
        }
    }
}
