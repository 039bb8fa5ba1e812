//! Subcommand flags parsed from a list of strings, as the command line would parse them — for
//! code that starts a subcommand in-process (the demo, tests) with the same flags a user types.

use std::ffi::OsString;

/// Parses `flags` (without the subcommand's name) into `T`.
pub fn parse_flags<T, I, S>(name: &'static str, flags: I) -> Result<T, clap::Error>
where
    T: clap::Args + clap::FromArgMatches,
    I: IntoIterator<Item = S>,
    S: Into<OsString> + Clone,
{
    let cmd = T::augment_args(clap::Command::new(name));
    let argv = std::iter::once(OsString::from(name)).chain(flags.into_iter().map(Into::into));
    T::from_arg_matches(&cmd.try_get_matches_from(argv)?)
}
