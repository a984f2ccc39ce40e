//! `trialflow load`: synthetic load against a running pipeline (`trialflow run`), for scale beyond
//! the replayed pilot data and for the benchmarks. It drives the pipeline the way its clients do —
//! site staff through the site API, patient apps through the ePRO gateway, an EDC publishing vital
//! signs straight to the clinical topic — in three phases:
//!
//! 1. **Set-up**: one study (arms `PBO`, `LOW`, `HIGH` at 1:1:1, the factor `AGEGR`, kit type
//!    `BOX`, ages 18 to 85 and one inclusion criterion), `--sites` sites, and kits enough for every
//!    subject of a site to get any arm, so no subject waits for a kit.
//! 2. **Enrollment**: screening, consent and an enrollment request for each of `--subjects`
//!    subjects, `--rate` requests per second overall; with `--enrollment-rate`, every subject is
//!    screened and consented first, then the enrollment requests follow at that rate (the saga
//!    loaded on its own).
//! 3. **Steady state**: `--rate` inputs per second for `--duration` seconds, round-robin over the
//!    subjects: four vital signs for each PHQ-9 submission. Every value is normal, so no alert fires.
//!
//! **Pacing** follows a fixed timetable: slot `n` of a phase starts `n / rate` seconds after the
//! phase began, and a sender that fell behind takes its late slots at once instead of lowering the
//! rate. At most `--concurrency` requests are in flight, so a pipeline that cannot keep up shows as
//! an achieved rate below the target, and the summary says so. Latencies count from the slot, so
//! time spent queueing for a slot counts too.
//!
//! **Reruns are idempotent.** Ids, idempotency keys and the inputs' clinical times are functions of
//! the study id, the input's index and the study's timeline start (`--epoch`; a generated study id,
//! `LOAD-<8 hex>`, carries it: the unix seconds of its first run). A rerun with the same study and
//! settings gets every site API command answered from the first run (`Idempotent-Replayed`) and
//! resends identical vital signs and submissions, which the consumers take as duplicates: no new
//! subject, reading or response.
//!
//! One file per job: `config.rs` (the settings, from `trialflow load`'s flags or built in code),
//! `plan.rs` (who is who and what each input says: functions of the study, an index and the
//! timeline, no IO), `drive.rs` (the three phases: pacing, sending, counting each answer) and
//! `report.rs` (what a run sent and how the pipeline answered).

mod config;
mod drive;
mod plan;
mod report;

pub use config::{GENERATED_STUDY_PREFIX, LoadArgs, LoadConfig, Tokens, epoch_of, generated_study_id};
pub use drive::run_load;
pub use plan::EPRO_EVERY;
pub use report::{Input, LoadReport, PhaseReport, Quantiles};

use tokio_util::sync::CancellationToken;

/// `trialflow load`: generates the load, prints the summary, and fails if anything was refused.
pub async fn run(args: LoadArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (config, note) = args.into_config();
    if let Some(note) = note {
        eprintln!("load: {note}");
    }
    let report = run_load(config, &shutdown).await?;
    println!("{report}");
    report.check()
}
