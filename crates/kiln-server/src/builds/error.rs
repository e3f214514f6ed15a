//! What the template build service refuses or fails at (`crate::error` maps each to
//! its HTTP answer).

/// A failure of a [`super::TemplateBuilds`] operation.
#[derive(Debug, thiserror::Error)]
pub enum BuildServiceError {
    #[error(
        "invalid template name {name:?}: use alias, alias:tag or namespace/alias:tag, \
         with an alias of 1-64 of a-z, 0-9, '-' and '_'"
    )]
    InvalidName { name: String },
    #[error("invalid tag {tag:?}: use 1-128 of a-z, 0-9, '-', '_' and '.'")]
    InvalidTag { tag: String },
    #[error("invalid target {target:?}: give name or name:tag")]
    InvalidTarget { target: String },
    #[error("give the template a name (\"name\": \"alias[:tag]\")")]
    MissingName,
    #[error("give at least one tag")]
    NoTags,
    #[error("the default tag cannot be removed; delete the template instead")]
    DefaultTag,
    #[error("\"base\" is Kiln's built-in template; build yours under another name")]
    BaseNotBuildable,
    #[error("\"base\" is Kiln's built-in template and cannot be deleted")]
    BaseNotDeletable,
    #[error("template {name:?} is a built-in: only admin keys change it")]
    BuiltIn { name: String },
    #[error("the template name {name:?} is taken; choose another name")]
    NameTaken { name: String },
    #[error(
        "your team's templates take {used_mb} MiB, at or over its quota of {max_mb} MiB \
         (maxTemplateDiskMB); delete a template or ask the operator to raise the quota"
    )]
    OverDiskQuota { used_mb: u64, max_mb: u64 },
    #[error("the control plane's database failed")]
    Owners(#[from] crate::store::StoreError),
    #[error("cpuCount must be 1-64 and memoryMB 128-65536 (got {cpu_count} and {memory_mb})")]
    Resources { cpu_count: u32, memory_mb: u64 },
    #[error("files hash {hash:?} must be 64 lower-case hex digits")]
    FilesHash { hash: String },
    /// A recipe Kiln cannot build; its message names the step.
    #[error(transparent)]
    Recipe(#[from] kiln_template::recipe::RecipeError),
    #[error("the recipe is not a build spec")]
    Spec(#[source] serde_json::Error),
    #[error("template {name:?} not found")]
    TemplateNotFound { name: String },
    #[error("template {name:?} has no tag {tag:?}")]
    TagNotFound { name: String, tag: String },
    /// An unknown build on E2B's build routes, answered as E2B does (400).
    #[error("Build '{build_id}' not found")]
    BuildNotFound { build_id: String },
    /// A cancel of a build this server does not know.
    #[error("build {build_id:?} not found")]
    NoBuildToCancel { build_id: String },
    #[error("build {build_id} belongs to template {owner}, not {template}")]
    WrongTemplate {
        build_id: String,
        owner: String,
        template: String,
    },
    #[error("build is not in waiting state")]
    NotWaiting,
    #[error("build {build_id} already finished ({status}); only a waiting or running build can be cancelled")]
    AlreadyFinished {
        build_id: String,
        status: &'static str,
    },
    #[error("unknown or used upload link")]
    UnknownUpload,
    #[error(
        "this upload link expired (links are valid for {valid_secs} s); ask for a new one \
         with GET /templates/{{id}}/files/{{hash}}"
    )]
    UploadExpired { valid_secs: u64 },
    #[error("the uploaded files are larger than {limit} bytes, the limit for one COPY context")]
    UploadTooLarge { limit: u64 },
    #[error("upload interrupted: {reason}")]
    UploadInterrupted { reason: String },
    #[error("storing the uploaded files failed")]
    UploadStore(#[source] std::io::Error),
    #[error("saving the template tags failed")]
    Tags(#[source] std::io::Error),
    #[error("reading the build log failed")]
    Log(#[source] std::io::Error),
    #[error("the template store failed")]
    Store(#[source] kiln_template::TemplateError),
    /// A build the server started itself failed.
    #[error("{reason}")]
    BuildFailed { reason: String },
    #[error(transparent)]
    GcPolicy(#[from] kiln_template::gc::BadDays),
}

impl From<kiln_template::TemplateError> for BuildServiceError {
    fn from(e: kiln_template::TemplateError) -> Self {
        match e {
            kiln_template::TemplateError::InvalidName { name, .. } => {
                BuildServiceError::InvalidName { name }
            }
            e => BuildServiceError::Store(e),
        }
    }
}
